"""A device channel in Python: a split-driver pair, device type
`xlchan`, built from grant pages + an event channel + the XenStore handshake.

XenStore (toolstack part done by the backend command, as libxl does for vbd):
  backend  /local/domain/0/backend/xlchan/DOMID/DEVID  {frontend, frontend-id, online, state}
  frontend /local/domain/DOMID/device/xlchan/DEVID     {backend, backend-id, state,
                                                         ring-ref, data-refs, event-channel}
Handshake: backend InitWait -> frontend shares the ring page and data pages
(gntalloc), offers an event channel, publishes ring-ref/data-refs/event-channel
in one transaction, moves to Initialised -> backend maps them (gntdev), binds
the channel, moves to Connected -> frontend Connected. Orderly closedown, as
the XenBus protocol orders it: frontend Closing -> backend unmaps, unbinds,
Closing -> frontend frees its pages, Closed -> backend Closed. A closedown
the backend begins (it refused the frontend's ring) starts at backend Closing.

Wire format (one ring page, 16-byte entries, 128 slots; one data page per
request in flight, owned by the backend from request to response, as blkif's
persistent grants):
  request  u32 id, u8 op, u8 flags, u16 page, u32 len, u32 crc32(payload)
  response u32 id, u8 op, i8 status, u16 page, u32 len, u32 crc32(payload)
ECHO: the backend checks the crc and writes the payload back reversed with
its own crc (data both ways); WRITE: checked only; READ: the backend fills
the page; NOP: no data (fills the ring without touching pages).

Peer death: the frontend asks gntalloc to clear the `alive` byte (the ring's
protocol-private pvt byte) and send an event when its pages go away; the
backend wakes, sees the byte cleared, unmaps and closes."""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import time
import zlib

from .errors import AgentError, Stopped, raise_stopped
from .evtchn import EventChannel
from .facts import CLOSED, CLOSING, CONNECTED, INITIALISED, INITIALISING, INITWAIT, STATE_NAMES
from .grant import PAGE, MappedPages, SharedPages
from .placement import Placement
from .ring import PVT_OFFSET, BackRing, FrontRing, RingError, SharedRing, mb
from .xs import XenStore, XsError

DEVTYPE = "xlchan"
REQ = struct.Struct("=IBBHII")
RSP = struct.Struct("=IBbHII")
ENTRY = 16
OP_NOP, OP_ECHO, OP_WRITE, OP_READ = 0, 1, 2, 3
ST_OK, ST_EINVAL, ST_EBADMSG = 0, -1, -2
ALIVE = PVT_OFFSET


class DevchanError(AgentError):
    pass



def paths(domid: int, devid: int, backend_domid: int = 0) -> tuple[str, str]:
    return (f"/local/domain/{backend_domid}/backend/{DEVTYPE}/{domid}/{devid}", f"/local/domain/{domid}/device/{DEVTYPE}/{devid}")


def pattern(n: int, length: int) -> bytes:
    """A deterministic payload for request n."""
    seed = struct.pack("=I", n * 2654435761 & 0xFFFFFFFF)
    return (seed * (length // 4 + 1))[:length]


def state_of(xs: XenStore, path: str) -> int:
    value = xs.try_read(f"{path}/state")
    try:
        return int(value) if value is not None else CLOSED
    except ValueError:
        return CLOSED


# -- backend ---------------------------------------------------------------------
class Backend:
    def __init__(self, domid: int, devid: int, timeout: float):
        self.domid, self.devid, self.timeout = domid, devid, timeout
        self.xs = XenStore()
        self.be, self.fe = paths(domid, devid)
        self.pages: MappedPages | None = None
        self.ev: EventChannel | None = None
        self.stats = {"requests": 0, "bytes_in": 0, "bytes_out": 0, "bad_requests": 0, "notifies_sent": 0, "wakeups": 0}
        self.states: list[str] = []

    def set_state(self, state: int) -> None:
        self.xs.write(f"{self.be}/state", state)
        self.states.append(STATE_NAMES[state])

    def create_nodes(self) -> None:
        """The toolstack's part: both directories, with the frontend's owned by its domain."""
        if self.xs.try_read(f"{self.be}/state") is not None:
            raise DevchanError(f"device {DEVTYPE}/{self.devid} of domain {self.domid} already exists ({self.be})",
                               "pick another --devid or remove the stale nodes (xenstore-rm)")
        with self.xs.transaction() as tx:
            for key, value in (("frontend", self.fe), ("frontend-id", self.domid), ("online", 1), ("state", INITIALISING)):
                self.xs.write(f"{self.be}/{key}", value, tx)
            for key, value in (("backend", self.be), ("backend-id", 0), ("state", INITIALISING)):
                self.xs.write(f"{self.fe}/{key}", value, tx)
            # Nodes written before set_perms keep their own (dom0-only) permissions: set each.
            for key in ("", "/frontend", "/frontend-id", "/online", "/state"):
                self.xs.set_perms(f"{self.be}{key}", ["n0", f"r{self.domid}"], tx)
            self.xs.set_perms(self.fe, [f"n{self.domid}", "r0"], tx)
            for key in ("backend", "backend-id", "state"):
                self.xs.set_perms(f"{self.fe}/{key}", [f"n{self.domid}", "r0"], tx)

    def connect(self) -> None:
        self.set_state(INITWAIT)
        self.xs.wait_for(f"{self.fe}/state", lambda v: int(v) >= INITIALISED, self.timeout, "the frontend to reach Initialised")
        if state_of(self.xs, self.fe) != INITIALISED:
            raise DevchanError(f"frontend moved to {STATE_NAMES[state_of(self.xs, self.fe)]} instead of Initialised")
        try:
            ring_ref = int(self.xs.read(f"{self.fe}/ring-ref"))
            data_refs = [int(r) for r in self.xs.read(f"{self.fe}/data-refs").split()]
            port = int(self.xs.read(f"{self.fe}/event-channel"))
        except (XsError, ValueError) as e:
            raise DevchanError(f"frontend published no usable ring-ref/data-refs/event-channel: {e}") from None
        if not 1 <= len(data_refs) <= 1024:
            raise DevchanError(f"frontend published {len(data_refs)} data pages (1..1024 allowed)")
        self.pages = MappedPages(self.domid, [ring_ref] + data_refs)
        self.npages = len(data_refs)
        self.ev = EventChannel()
        self.port = self.ev.bind_interdomain(self.domid, port)
        self.sring = SharedRing(self.pages.map, ENTRY, PAGE)
        self.ring = BackRing(self.sring)
        self.data = memoryview(self.pages.map)[PAGE:]
        self.set_state(CONNECTED)

    def handle(self, raw: bytes) -> bytes:
        rid, op, _flags, page, length, crc = REQ.unpack_from(raw)
        self.stats["requests"] += 1
        if op == OP_NOP:
            return RSP.pack(rid, op, ST_OK, page, 0, 0)
        if op not in (OP_ECHO, OP_WRITE, OP_READ) or page >= self.npages or length > PAGE:
            self.stats["bad_requests"] += 1
            return RSP.pack(rid, op, ST_EINVAL, page, 0, 0)
        off = page * PAGE
        if op == OP_READ:
            payload = pattern(rid, length)
            self.data[off: off + length] = payload
            self.stats["bytes_out"] += length
            return RSP.pack(rid, op, ST_OK, page, length, zlib.crc32(payload))
        payload = bytes(self.data[off: off + length])  # copy once: the frontend could still scribble on it
        if zlib.crc32(payload) != crc:
            self.stats["bad_requests"] += 1
            return RSP.pack(rid, op, ST_EBADMSG, page, 0, 0)
        self.stats["bytes_in"] += length
        if op == OP_WRITE:
            return RSP.pack(rid, op, ST_OK, page, 0, 0)
        back = payload[::-1]
        self.data[off: off + length] = back
        self.stats["bytes_out"] += length
        return RSP.pack(rid, op, ST_OK, page, length, zlib.crc32(back))

    def serve(self) -> str:
        """Process requests until the frontend closes or dies; returns why it ended."""
        token = "xlchan-fe-state"
        self.xs.watch(f"{self.fe}/state", token)
        try:
            while True:
                batch = 0
                while self.ring.unconsumed_requests():
                    self.ring.put_response(self.handle(self.ring.get_request()))
                    batch += 1
                    if batch % 32 == 0 and self.ring.push_responses():  # let the frontend refill early
                        self._notify()
                if self.ring.push_responses():
                    self._notify()
                if self.ring.final_check_for_requests():
                    continue
                if self.sring.mv[ALIVE] == 0:
                    return "peer-died"
                assert self.ev is not None  # bound by connect(), which serving follows
                fired, _ = self.ev.wait_or_watch(self.xs, 2.0)
                self.stats["wakeups"] += bool(fired)
                mb()
                if self.sring.mv[ALIVE] == 0:
                    return "peer-died"
                fe_state = state_of(self.xs, self.fe)
                if fe_state in (CLOSING, CLOSED):
                    return "frontend-closed"
        finally:
            self.xs.unwatch(f"{self.fe}/state", token)

    def _notify(self) -> None:
        assert self.ev is not None  # bound by connect(); only the ring loop notifies
        self.ev.notify(self.port)
        self.stats["notifies_sent"] += 1

    def disconnect(self) -> None:
        """Unmap and unbind; safe to call in any state."""
        if getattr(self, "sring", None) is not None:
            self.data.release()
            self.sring.release()
            del self.sring  # it exists only while connected (the getattr above)
        if self.pages is not None:
            self.pages.close()
            self.pages = None
        if self.ev is not None:
            self.ev.close()
            self.ev = None

    def remove_nodes(self) -> None:
        """The toolstack's part again: remove both directories, and their parents once empty."""
        for path in (self.be, self.fe):
            self.xs.rm_with_parents(path, 2)  # .../xlchan/DOMID and .../xlchan


def run_backend(domid: int, devid: int = 0, timeout: float = 120.0, keep_nodes: bool = False, place: bool = False) -> dict:
    """place: serve from dom0 vCPU 0 alone on a physical CPU, with the
    channel's interrupt delivered there and the domU on the other CPUs, for
    this session only (see placement.py)."""
    signal.signal(signal.SIGTERM, raise_stopped)
    b = Backend(domid, devid, timeout)
    if b.xs.try_read(f"/local/domain/{domid}") is None and domid != 0:
        raise DevchanError(f"domain {domid} does not exist (no /local/domain/{domid} in XenStore)", "check `xl list`")
    placement = Placement(domid, 0, "xlchan") if place else None
    with placement or contextlib.nullcontext():
        result = _serve_backend(b, domid, devid, keep_nodes, placement)
    if placement:
        result["placement"] = placement.report
    return result


def _serve_backend(b: Backend, domid: int, devid: int, keep_nodes: bool, placement: Placement | None) -> dict:
    b.create_nodes()
    print(f'{{"backend": "{b.be}", "frontend": "{b.fe}", "pid": {os.getpid()}}}', flush=True)
    ended = "error"
    error: AgentError | OSError | None = None
    t0 = time.monotonic()
    try:
        b.connect()
        if placement:
            placement.route()
        t0 = time.monotonic()
        ended = b.serve()
    except RingError as e:
        ended, error = "rejected-garbage", e
    except Stopped:
        ended = "stopped"
    except (AgentError, OSError) as e:
        error = e
    finally:
        elapsed = time.monotonic() - t0
        max_unconsumed = b.ring.max_unconsumed if getattr(b, "ring", None) else 0
        ring_size = b.ring.size if getattr(b, "ring", None) else 0
        b.disconnect()
        if ended in ("frontend-closed", "rejected-garbage"):
            # Unmapped: the frontend may free its pages once it sees Closing; we close after it.
            b.set_state(CLOSING)
            try:
                b.xs.wait_for(f"{b.fe}/state", lambda v: int(v) == CLOSED, 30, "the frontend to reach Closed")
            except XsError:
                ended += "/frontend-never-closed"
        b.set_state(CLOSED)
        if not keep_nodes:
            b.remove_nodes()
    result = {
        "ended": ended, "domid": domid, "devid": devid, "states": b.states, "seconds": round(elapsed, 3),
        "ring_size": ring_size, "max_unconsumed": max_unconsumed, **b.stats,
        "mapped_after": b.pages is not None, "bound_after": b.ev is not None,
    }
    if error is not None:
        result["error"] = str(error)
        if ended != "rejected-garbage":
            raise DevchanError(f"backend failed: {error}", getattr(error, "hint", ""))
    return result


# -- frontend --------------------------------------------------------------------
class Frontend:
    def __init__(self, devid: int, data_pages: int, timeout: float):
        self.xs = XenStore()
        self.domid = int(self.xs.read("domid")) if self.xs.try_read("domid") is not None else 0
        self.devid, self.timeout = devid, timeout
        _, self.fe = paths(self.domid, devid)
        be = self.xs.try_read(f"{self.fe}/backend")
        if be is None:
            raise DevchanError(f"no device {DEVTYPE}/{devid} for domain {self.domid} ({self.fe}/backend missing)",
                               "start the backend in dom0 first (it creates the device's XenStore nodes)")
        self.be = be
        self.backend_id = int(self.xs.read(f"{self.fe}/backend-id"))
        self.npages = data_pages
        self.shared: SharedPages | None = None
        self.ev: EventChannel | None = None

    def set_state(self, state: int) -> None:
        self.xs.write(f"{self.fe}/state", state)

    def connect(self, start_index: int) -> None:
        self.xs.wait_for(f"{self.be}/state", lambda v: int(v) >= INITWAIT, self.timeout, "the backend to reach InitWait")
        self.shared = SharedPages(self.backend_id, 1 + self.npages)
        self.sring = SharedRing(self.shared.map, ENTRY, PAGE)
        self.sring.init(start_index)
        self.ring = FrontRing(self.sring)
        self.data = memoryview(self.shared.map)[PAGE:]
        self.ev = EventChannel()
        self.port = self.ev.bind_unbound(self.backend_id)
        self.sring.mv[ALIVE] = 1
        # If this process dies, the kernel clears `alive` and kicks the backend.
        self.shared.set_unmap_notify(offset=ALIVE, port=self.port)
        while True:
            try:
                with self.xs.transaction() as tx:
                    self.xs.write(f"{self.fe}/ring-ref", self.shared.refs[0], tx)
                    self.xs.write(f"{self.fe}/data-refs", " ".join(map(str, self.shared.refs[1:])), tx)
                    self.xs.write(f"{self.fe}/event-channel", self.port, tx)
                    self.xs.write(f"{self.fe}/state", INITIALISED, tx)
                break
            except XsError as e:
                if e.message.endswith("EAGAIN"):
                    continue
                raise
        self.xs.wait_for(f"{self.be}/state", lambda v: int(v) >= CONNECTED, self.timeout, "the backend to reach Connected")
        if state_of(self.xs, self.be) != CONNECTED:
            raise DevchanError(f"backend went to {STATE_NAMES[state_of(self.xs, self.be)]} instead of Connected")
        self.ev.wait(self.port, 0.2)  # drop a stale pending bit from the bind
        self.set_state(CONNECTED)

    def run(self, count: int, size: int, op: int, burst: bool, delay: float, evil: str) -> dict:
        assert self.ev is not None  # bound by connect(), which running follows
        ring, data = self.ring, self.data
        free_pages = list(range(self.npages))
        inflight: dict[int, tuple[int, int, int]] = {}  # id -> (page, len, crc of what we expect back)
        sent = done = full_seen = notifies = waits = 0
        bytes_out = bytes_in = 0
        t0 = time.monotonic()
        if evil == "garbage-prod":
            # Publish a producer index far beyond anything queued: the backend must refuse it.
            self.sring.idx[0] = (self.ring.rsp_cons + 100000) & 0xFFFFFFFF
            self.ev.notify(self.port)
            return {"evil": evil, "backend_state": STATE_NAMES[self._wait_backend_closed()]}
        while done < count:
            queued = 0
            while sent < count and not ring.full() and (op == OP_NOP or free_pages):
                page = free_pages.pop() if op != OP_NOP else 0
                length = 0 if op == OP_NOP else size
                payload = pattern(sent, length) if op in (OP_ECHO, OP_WRITE) else b""
                if payload:
                    data[page * PAGE: page * PAGE + length] = payload
                crc = zlib.crc32(payload)
                if evil == "bad-page" and sent == count // 2:
                    page = 0xFFFF
                ring.put_request(REQ.pack(sent, op, 0, page, length, crc))
                bytes_out += len(payload)
                expect = zlib.crc32(payload[::-1]) if op == OP_ECHO else zlib.crc32(pattern(sent, length)) if op == OP_READ else 0
                inflight[sent] = (page, length, expect)
                sent += 1
                queued += 1
                if burst and not ring.full():
                    continue
            if ring.full():
                full_seen += 1
            if queued and ring.push_requests():
                self.ev.notify(self.port)
                notifies += 1
            if delay:
                time.sleep(delay)
            got = 0
            while ring.unconsumed_responses():
                rid, rop, status, page, length, crc = RSP.unpack_from(ring.get_response())
                if rid not in inflight:
                    raise DevchanError(f"response for unknown request id {rid}")
                mypage, _, expect = inflight.pop(rid)
                if evil == "bad-page" and mypage == 0xFFFF:
                    if status != ST_EINVAL:
                        raise DevchanError(f"backend answered a request for page 0xffff with status {status}, expected EINVAL")
                    done += 1
                    got += 1
                    continue
                if status != ST_OK:
                    raise DevchanError(f"request {rid} failed in the backend with status {status}")
                if rop in (OP_ECHO, OP_READ):
                    back = bytes(data[page * PAGE: page * PAGE + length])
                    if page != mypage or zlib.crc32(back) != crc or crc != expect:
                        raise DevchanError(f"request {rid}: payload checksum mismatch (page {page}, len {length})")
                    bytes_in += length
                if rop != OP_NOP:
                    free_pages.append(mypage)
                done += 1
                got += 1
            if got or (sent < count and not ring.full() and (op == OP_NOP or free_pages)):
                continue
            if ring.final_check_for_responses():
                continue
            waits += 1
            if self.ev.wait(self.port, self.timeout) is None:
                raise DevchanError(f"no response from the backend within {self.timeout:.0f} s ({done}/{count} done)",
                                   f"backend state: {STATE_NAMES[state_of(self.xs, self.be)]}")
        elapsed = time.monotonic() - t0
        return {
            "requests": done, "size": size, "op": op, "seconds": round(elapsed, 3),
            "requests_per_s": round(done / elapsed, 1) if elapsed else None,
            "mb_per_s": round((bytes_out + bytes_in) / elapsed / 1e6, 3) if elapsed else None,
            "bytes_out": bytes_out, "bytes_in": bytes_in, "ring_size": ring.size, "ring_full_seen": full_seen,
            "notifies_sent": notifies, "sleeps": waits, "indices": self.sring.header(),
        }

    def _wait_backend_closed(self, state: int = CLOSING) -> int:
        try:
            # Its directory gone counts: a backend removes its nodes once Closed.
            self.xs.wait_for(f"{self.be}/state", lambda v: int(v) >= state, self.timeout, "the backend to close", gone_ok=True)
        except XsError:
            pass
        return state_of(self.xs, self.be)

    def close(self) -> str:
        """Orderly closedown: Closing, wait for the backend to unmap (its Closing),
        free, Closed; the backend then closes too. The backend's last state."""
        self.set_state(CLOSING)
        self._wait_backend_closed()
        self.release()
        self.set_state(CLOSED)
        return STATE_NAMES[self._wait_backend_closed(CLOSED)]

    def release(self) -> None:
        if getattr(self, "sring", None) is not None:
            self.data.release()
            self.sring.release()
            del self.sring  # it exists only while connected (the getattr above)
        if self.shared is not None:
            self.shared.close()
            self.shared = None
        if self.ev is not None:
            self.ev.close()
            self.ev = None


def run_frontend(devid: int = 0, count: int = 1000, size: int = 512, op: str = "echo", data_pages: int = 128, burst: bool = False,
                 start_index: int = 0, delay: float = 0.0, evil: str = "", timeout: float = 60.0, hold: float = 0.0) -> dict:
    ops = {"nop": OP_NOP, "echo": OP_ECHO, "write": OP_WRITE, "read": OP_READ}
    if op not in ops:
        raise DevchanError(f"unknown op {op!r}", "one of: " + ", ".join(ops))
    if not 0 <= size <= PAGE:
        raise DevchanError(f"payload size {size} out of range", f"0..{PAGE}")
    signal.signal(signal.SIGTERM, raise_stopped)
    f = Frontend(devid, data_pages, timeout)
    try:
        f.connect(start_index)
        assert f.shared is not None  # connect() shared the pages
        print(f'{{"connected": true, "pid": {os.getpid()}, "port": {f.port}, "ring_ref": {f.shared.refs[0]}}}', flush=True)
        result = f.run(count, size, ops[op], burst, delay, evil)
        if hold:
            time.sleep(hold)
        if evil == "garbage-prod":
            f.release()
            f.set_state(CLOSED)
            result["backend_final_state"] = STATE_NAMES[f._wait_backend_closed(CLOSED)]
            return result
        result["backend_final_state"] = f.close()
        return result
    except Stopped:
        return {"ended": "stopped"}
    finally:
        f.release()


def main(argv: list[str] | None = None) -> int:
    from .cmdline import run_main

    return run_main({"backend": run_backend, "frontend": run_frontend}, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
