"""A block backend in Python, in dom0 userspace, and the attaching and
detaching of extra disks to a running domU through it or through the
kernel's blkback. Run in dom0 as `python3 -m xenlab_agent.blkback VERB`:

  attach NAME --size-mib N [--backend python|kernel] [--readonly] [--faults PLAN] [--vdev xvdX]
  detach NAME VDEV [--timeout S]
  list NAME
  serve SPEC          the backend process itself (attach starts it, detached)

The Python backend speaks blkif (blkif.py) over a file: read, write,
flush (with or without data), discard; up to 11 segments a request, or
indirect pages; persistent grants when the frontend offers them; rings of
up to 2**4 pages. It writes the XenStore nodes a toolstack writes, under
backend type `pyblk` (facts.PY_BLOCK_BACKEND) so kernel blkback, which
serves only `vbd`, leaves the device alone; the guest's own blkfront sees
a vbd like any other.

A fault plan (faultplan.py) makes it misbehave on purpose. What it did is
in its report (`faults_fired`), which `detach` returns.

Closedown: detach (SIGTERM to the backend) moves the backend to Closing
and keeps answering requests until the frontend is Closed (or the timeout),
then unmaps, unbinds, moves to Closed and removes both directories. A
frontend that closes on its own, or a domain that goes away, ends it too."""

from __future__ import annotations

import json
import mmap
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import NoReturn

from . import blkattach, facts, faultplan
from .blkattach import BlkbackError, node_state, paths
from .blkif import (
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    DEVICE_TYPE,
    DISCARD_ALIGNMENT,
    DISCARD_GRANULARITY,
    DISCARD_SECURE,
    EVENT_CHANNEL,
    FEATURE_DISCARD,
    FEATURE_FLUSH_CACHE,
    FEATURE_MAX_INDIRECT_SEGMENTS,
    FEATURE_PERSISTENT,
    INFO,
    LINUX_MAX_RING_PAGE_ORDER,
    MAX_RING_PAGE_ORDER,
    MODE,
    MULTI_QUEUE_NUM_QUEUES,
    OP_NAMES,
    PARAMS,
    PHYSICAL_SECTOR_SIZE,
    PROTOCOL,
    PROTOCOL_X86_64,
    RING_ENTRY_SIZE,
    RING_PAGE_ORDER,
    SECTOR_SIZE,
    SECTOR_SIZE_KEY,
    SECTORS,
    VDISK_READONLY,
    VIRTUAL_DEVICE,
    BadRequest,
    IndirectRequest,
    Response,
    ring_ref_keys,
    unpack_request,
)
from .blkreq import MAX_INDIRECT_SEGMENTS, BlockRequests
from .cmdline import run_main
from .errors import AgentError, Stopped, raise_stopped
from .evtchn import EventChannel
from .facts import CLOSED, CLOSING, CONNECTED, INITIALISED, INITIALISING, INITWAIT, STATE_NAMES
from .grant import PAGE, GrantError, GrantMapper
from .ring import RSP_PROD, BackRing, RingError, SharedRing, mb
from .sysutil import atomic_write
from .xs import XenStore, XsError

LATE_EVENT_SECONDS = 0.5  # lost-notify: the event a skipped one is made up by, when no request comes


class BlockBackend(BlockRequests):
    def __init__(self, spec: dict):
        self.domid, self.devid, self.vdev = spec["domid"], spec["devid"], spec["vdev"]
        self.path, self.readonly = spec["path"], spec["readonly"]
        self.plan = faultplan.parse_plan(spec["faults"]) if spec.get("faults") else []
        self.faults = {f.name: f for f in self.plan if f.name != "io-error"}
        self.io_errors = [f for f in self.plan if f.name == "io-error"]
        self.timeout = spec.get("timeout", 60)
        self.be, self.fe = paths(self.domid, self.devid)
        self.xs = XenStore()
        self.fd = os.open(self.path, os.O_RDONLY if self.readonly else os.O_RDWR)
        self.sectors = os.fstat(self.fd).st_size // SECTOR_SIZE
        self.mapper = GrantMapper()
        self.ring_map: mmap.mmap | None = None
        self.ev: EventChannel | None = None
        self.persistent: dict[int, tuple] = {}  # gref -> (index, mapping, memoryview)
        self.use_persistent = False
        self.poisoned = ""  # set once a fault broke the ring on purpose: nothing more is consumed
        self.jumped = False
        self.closing_since: float | None = None
        self.owed_event: float | None = None  # lost-notify: when the skipped event was due
        self.states: list[str] = []
        self.fired: dict[str, int] = {}
        self.stats = {"requests": 0, "responses": 0, "errors": 0, "bytes_read": 0, "bytes_written": 0, "flushes": 0,
                      "discards": 0, "indirect": 0, "notifies_sent": 0, "wakeups": 0, "grants_mapped": 0,
                      "persistent_grants": 0, "max_segments": 0}
        self.ops: dict[str, int] = {}  # requests per operation name: the report's "ops"
        self.counts = {"data_requests": 0, "batches": 0, "events": 0}

    # -- XenStore: the toolstack's part and the handshake ------------------------
    def log(self, what: str, **data) -> None:
        print(json.dumps({"t": round(time.time(), 3), "what": what, **data}), flush=True)

    def fire(self, name: str, **data) -> None:
        self.fired[name] = self.fired.get(name, 0) + 1
        self.log("fault", fault=name, **data)

    def set_state(self, state: int) -> None:
        self.xs.write(f"{self.be}/state", state)
        self.states.append(STATE_NAMES[state])
        self.log("state", state=STATE_NAMES[state])

    def create_nodes(self) -> None:
        if self.xs.try_read(f"{self.fe}/state") is not None:
            raise BlkbackError(f"domain {self.domid} already has a vbd {self.devid} ({self.fe})", "pick another --vdev")
        order = self.faults["bad-ring-page-order"]["value"] if "bad-ring-page-order" in self.faults else LINUX_MAX_RING_PAGE_ORDER
        indirect = self.faults["bad-max-indirect-segments"]["value"] if "bad-max-indirect-segments" in self.faults else MAX_INDIRECT_SEGMENTS
        back = {
            "frontend": self.fe, "frontend-id": self.domid, "online": 1, "state": INITIALISING,
            PARAMS: self.path, MODE: "r" if self.readonly else "w", "dev": self.vdev, "type": "file",
            MAX_RING_PAGE_ORDER: order, FEATURE_MAX_INDIRECT_SEGMENTS: indirect, FEATURE_PERSISTENT: 1,
            FEATURE_FLUSH_CACHE: 1, FEATURE_DISCARD: 0 if self.readonly else 1,
            DISCARD_GRANULARITY: PAGE, DISCARD_ALIGNMENT: 0, DISCARD_SECURE: 0,
        }
        front = {"backend": self.be, "backend-id": 0, "state": INITIALISING, VIRTUAL_DEVICE: self.devid, DEVICE_TYPE: "disk"}
        with self.xs.transaction() as tx:
            for key, value in back.items():
                self.xs.write(f"{self.be}/{key}", value, tx)
            for key, value in front.items():
                self.xs.write(f"{self.fe}/{key}", value, tx)
            # Nodes written before set_perms keep dom0-only permissions: set each.
            for key in ("", *(f"/{k}" for k in back)):
                self.xs.set_perms(f"{self.be}{key}", ["n0", f"r{self.domid}"], tx)
            for key in ("", *(f"/{k}" for k in front)):
                self.xs.set_perms(f"{self.fe}{key}", [f"n{self.domid}", "r0"], tx)
        self.log("nodes", backend=self.be, frontend=self.fe, plan=faultplan.format_plan(self.plan))

    def connect(self) -> None:
        self.set_state(INITWAIT)
        deadline = time.monotonic() + self.timeout
        while (state := node_state(self.xs, self.fe)) is not None and state < INITIALISED:
            if time.monotonic() > deadline:
                raise BlkbackError(f"the frontend {self.fe} stayed {STATE_NAMES[state]} for {self.timeout:.0f} s",
                                   "is the guest's blkfront loaded? see the guest's console")
            self.xs.wait_for(f"{self.fe}/state", lambda v: v.isdigit() and int(v) >= INITIALISED, max(0.1, deadline - time.monotonic()),
                             "the frontend to reach Initialised", gone_ok=True)
        if state != INITIALISED:
            raise BlkbackError(f"frontend moved to {facts.state_name(state)} instead of Initialised")
        def read(key: str, default: str = "") -> str:
            value = self.xs.try_read(f"{self.fe}/{key}")
            return default if value is None else value

        protocol = read(PROTOCOL, PROTOCOL_X86_64)
        if protocol != PROTOCOL_X86_64:
            self._refuse(f"frontend protocol {protocol!r}; only {PROTOCOL_X86_64} is handled")
        if int(read(MULTI_QUEUE_NUM_QUEUES, "1")) != 1:
            self._refuse("frontend asked for several queues; none were offered")
        order = int(read(RING_PAGE_ORDER, "0"))
        if not 0 <= order <= LINUX_MAX_RING_PAGE_ORDER:
            self._refuse(f"frontend ring-page-order {order} is beyond the {LINUX_MAX_RING_PAGE_ORDER} this backend maps")
        try:
            refs = [int(read(key)) for key in ring_ref_keys(order)]
            port = int(read(EVENT_CHANNEL))
        except ValueError:  # a missing node reads "" here
            self._refuse(f"frontend published no usable {', '.join(ring_ref_keys(order))} / {EVENT_CHANNEL}")
        self.use_persistent = read(FEATURE_PERSISTENT, "0") == "1"
        try:
            self.ring_index, self.ring_map = self.mapper.map(self.domid, refs, writable=True)
        except GrantError as e:
            self._refuse(f"cannot map the ring: {e.message}")
        self.sring = SharedRing(self.ring_map, RING_ENTRY_SIZE, PAGE << order)
        self.ring = BackRing(self.sring)
        self.ev = EventChannel()
        self.port = self.ev.bind_interdomain(self.domid, port)
        with self.xs.transaction() as tx:
            for key, value in ((SECTORS, self.sectors), (INFO, VDISK_READONLY if self.readonly else 0),
                               (SECTOR_SIZE_KEY, SECTOR_SIZE), (PHYSICAL_SECTOR_SIZE, SECTOR_SIZE)):
                self.xs.write(f"{self.be}/{key}", value, tx)
                self.xs.set_perms(f"{self.be}/{key}", ["n0", f"r{self.domid}"], tx)
        self.set_state(CONNECTED)
        self.log("connected", ring_pages=1 << order, ring_slots=self.ring.size, port=self.port, persistent=self.use_persistent)

    def _refuse(self, why: str) -> NoReturn:
        self.xs.write(f"{self.be}/error", why)
        raise BlkbackError(why, "the frontend's request cannot be served; the device is closed")

    # -- requests -------------------------------------------------------------------
    def handle(self, raw: bytes) -> list[bytes]:
        """The responses (0, 1 or 2 of them, packed) to one request slot."""
        self.stats["requests"] += 1
        try:
            req = unpack_request(raw)
        except BadRequest as e:
            self.log("bad-request", error=e.message)
            return [self._respond(e.request_id, e.operation, BLKIF_RSP_ERROR)]
        rsp_op = req.indirect_op if isinstance(req, IndirectRequest) else req.operation
        name = OP_NAMES.get(rsp_op, str(rsp_op))
        self.ops[name] = self.ops.get(name, 0) + 1
        try:
            status = self._serve(req)
        except (BlkbackError, GrantError) as e:
            self.log("request-failed", id=req.id, op=name, error=e.message)
            status = BLKIF_RSP_ERROR
        if "slow" in self.faults:
            time.sleep(self.faults["slow"]["ms"] / 1000)
            self.fired["slow"] = self.fired.get("slow", 0) + 1
        n = self.stats["requests"]
        fault = self.faults.get("unknown-id")
        if fault and fault.fires(n):
            self.fire("unknown-id", id=req.id, sent=self.ring.size + n)
            self.poisoned = "unknown-id"
            return [self._respond(self.ring.size + n, rsp_op, status)]
        out = [self._respond(req.id, rsp_op, status)]
        fault = self.faults.get("duplicate-response")
        if fault and fault.fires(n):
            self.fire("duplicate-response", id=req.id)
            self.poisoned = "duplicate-response"
            out.append(out[0])
        return out

    def _respond(self, rid: int, op: int, status: int) -> bytes:
        if status != BLKIF_RSP_OKAY:
            self.stats["errors"] += 1
        return Response(rid & 0xFFFFFFFFFFFFFFFF, op & 0xFF, status).pack()

    # -- the ring loop ------------------------------------------------------------------
    def serve(self) -> str:
        token = "pyblk-fe-state"
        self.xs.watch(f"{self.fe}/state", token)
        try:
            while True:
                if not self.poisoned:
                    self._drain()
                fe_state = node_state(self.xs, self.fe)
                if fe_state is None:
                    return "frontend-gone"
                if fe_state == CLOSED or (fe_state == CLOSING and self.closing_since is None):
                    return "frontend-closed"
                if self.closing_since is not None and time.monotonic() - self.closing_since > self.timeout:
                    return "frontend-never-closed"
                wait = 1.0
                if self.owed_event is not None:
                    wait = max(0.0, self.owed_event + LATE_EVENT_SECONDS - time.monotonic())
                    if wait == 0.0:
                        self.owed_event = None
                        self._notify()
                        continue
                assert self.ev is not None  # bound by connect(), which serving follows
                fired, _ = self.ev.wait_or_watch(self.xs, wait)
                self.stats["wakeups"] += bool(fired)
                mb()
        finally:
            try:
                self.xs.unwatch(f"{self.fe}/state", token)
            except XsError:
                pass

    def _drain(self) -> None:
        while True:
            answered = 0
            while not self.poisoned and self.ring.unconsumed_requests():
                if self._state_jump():
                    break
                for rsp in self.handle(self.ring.get_request()):
                    self._put(rsp)
                answered += 1
                self._after_request()
                if answered % 16 == 0:
                    self._push()  # let the frontend refill early
            if answered:
                self._push()
            if self.poisoned or not self.ring.final_check_for_requests():
                return

    def _put(self, rsp: bytes) -> None:
        # Written by hand so a fault may answer a slot twice (ring.put_response refuses).
        self.sring.write(self.ring.rsp_prod_pvt, rsp)
        self.ring.rsp_prod_pvt = (self.ring.rsp_prod_pvt + 1) & 0xFFFFFFFF
        self.stats["responses"] += 1

    def _after_request(self) -> None:
        n = self.stats["requests"]
        fault = self.faults.get("rsp-prod-past-req-prod")
        if fault and fault.fires(n):
            self._push()
            lie = (self.sring.idx[RSP_PROD] + self.ring.size + 1) & 0xFFFFFFFF
            self.sring.idx[RSP_PROD] = lie
            self.fire("rsp-prod-past-req-prod", rsp_prod=lie, req_prod=self.sring.idx[0])
            self.poisoned = "rsp-prod-past-req-prod"
            self._notify()
    def _state_jump(self) -> bool:
        """state-jump, with request N+1 waiting on the ring; True when the ring
        is to be left alone from now on (the jump to Closed)."""
        fault = self.faults.get("state-jump")
        if not fault or self.jumped or self.stats["requests"] != fault["after"]:
            return False
        self.jumped = True
        self._push()
        self.fire("state-jump", to=fault["to"], answered=self.stats["requests"])
        self.set_state(faultplan.STATE_JUMP_TARGETS[fault["to"]])
        if fault["to"] == "closed":
            self.poisoned = "state-jump"
        return self.poisoned != ""

    def _push(self) -> None:
        if self.poisoned == "rsp-prod-past-req-prod":
            return
        notify = self.ring.push_responses()
        self.counts["batches"] += 1
        fault = self.faults.get("extra-notify")
        if fault and fault.fires(self.counts["batches"]):
            self.fire("extra-notify", batch=self.counts["batches"])
            self._notify()
        if notify:
            self.counts["events"] += 1
            fault = self.faults.get("lost-notify")
            if fault and fault.fires(self.counts["events"]):
                self.fire("lost-notify", event=self.counts["events"])
                self.owed_event = self.owed_event or time.monotonic()
                return
            self.owed_event = None  # this event makes up for a skipped one
            self._notify()

    def _notify(self) -> None:
        assert self.ev is not None  # bound by connect(); only the ring loop notifies
        self.ev.notify(self.port)
        self.stats["notifies_sent"] += 1

    # -- closedown -----------------------------------------------------------------------
    def start_closing(self) -> None:
        if self.closing_since is None:
            self.closing_since = time.monotonic()
            self.xs.write(f"{self.be}/online", 0)
            self.set_state(CLOSING)

    def disconnect(self) -> None:
        if getattr(self, "sring", None) is not None:
            self.sring.release()
            del self.sring  # it exists only while connected (the getattr above)
        for index, mapping, view in self.persistent.values():
            view.release()
            self.mapper.unmap(index, mapping)
        self.persistent.clear()
        if self.ring_map is not None:
            self.mapper.unmap(self.ring_index, self.ring_map)
            self.ring_map = None
        if self.ev is not None:
            self.ev.close()
            self.ev = None
        self.mapper.close()

    def remove_nodes(self) -> None:
        for remove in (lambda: self.xs.rm(self.fe),  # device/vbd itself is the toolstack's (other disks live there)
                       lambda: self.xs.rm_with_parents(self.be, 2)):  # .../pyblk/DOMID, then .../pyblk, once empty
            try:
                remove()
            except XsError:
                pass


def serve(spec: dict) -> dict:
    """The backend process: create the nodes, connect, serve until detach or the frontend goes."""
    signal.signal(signal.SIGTERM, raise_stopped)
    b = BlockBackend(spec)
    ended = "error"
    error: Exception | None = None
    t0 = time.monotonic()
    try:
        b.create_nodes()
        b.connect()
        t0 = time.monotonic()
        try:
            ended = b.serve()
        except Stopped:
            b.start_closing()
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            ended = "detached"
            outcome = b.serve()  # answer what is in flight until the frontend is Closed
            if outcome != "frontend-closed" and outcome != "frontend-gone":
                ended = f"detached/{outcome}"
    except Stopped:
        ended = "detached"
    except RingError as e:
        ended, error = "rejected-garbage", e
    except (AgentError, OSError) as e:
        error = e
    except Exception as e:  # noqa: BLE001 - a bug here must still close the device and say what happened
        error = e
        traceback.print_exc()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the closedown runs to its end
        b.disconnect()
        if node_state(b.xs, b.fe) not in (None, CLOSED):
            b.start_closing()
            try:
                b.xs.wait_for(f"{b.fe}/state", lambda v: v == str(CLOSED), 10, "the frontend to reach Closed", gone_ok=True)
            except XsError:
                ended += "/frontend-never-closed"
        b.set_state(CLOSED)
        b.remove_nodes()
        os.close(b.fd)
    result = {
        "ended": ended, "domid": b.domid, "devid": b.devid, "vdev": b.vdev, "states": b.states,
        "seconds": round(time.monotonic() - t0, 3), "faults_fired": b.fired, "poisoned": b.poisoned,
        "ring_slots": b.ring.size if getattr(b, "ring", None) else 0, "persistent": b.use_persistent, **b.stats,
        "ops": b.ops,
    }
    if error is not None:
        result["error"] = str(error) if isinstance(error, AgentError) else repr(error)
    return result


def serve_profiled(spec: dict, top: int = 15) -> dict:
    """serve() under cProfile; the report gains the functions that took the most time of their own."""
    import cProfile

    profiler = cProfile.Profile()
    result = profiler.runcall(serve, spec)
    profiler.create_stats()  # the table pstats.Stats(profiler) would take over
    rows = sorted(profiler.stats.items(), key=lambda item: item[1][2], reverse=True)[:top]  # (cc, nc, tottime, cumtime, callers)
    result["profile"] = [{"function": f"{Path(file).name}:{line}:{func}", "calls": nc, "own_s": round(tt, 3), "cumulative_s": round(ct, 3)}
                         for (file, line, func), (cc, nc, tt, ct, callers) in rows]
    return result

# -- entry point -------------------------------------------------------------------------
# `python3 -m xenlab_agent.blkback VERB [NAME] [--option value]` (cmdline.run_main).

def serve_cmd(spec: str) -> None:
    """The backend process itself (attach starts it, detached); its report goes to the spec's result file."""
    request = json.loads(spec)
    result = serve_profiled(request) if request.get("profile") else serve(request)
    atomic_write(request["result"], json.dumps(result))


def attach_cmd(name: str, size_mib: int, backend: str = "kernel", readonly: bool = False, faults: str = "", vdev: str = "",
               timeout: float = 60.0, profile: bool = False, own_frontend: bool = False) -> dict:
    if backend not in ("python", "kernel"):
        raise BlkbackError(f"--backend {backend!r}: python or kernel")
    try:
        return blkattach.attach(name, size_mib, backend, readonly, faults, vdev, timeout, profile, own_frontend)
    except faultplan.FaultPlanError as e:
        raise BlkbackError(str(e), "see `xenlab guest attach --help` for the fault names") from None


def detach_cmd(name: str, vdev: str, timeout: float = 30.0) -> dict:
    return blkattach.detach(name, vdev, timeout)


def list_cmd(name: str) -> list[dict]:
    return blkattach.list_attached(name)


COMMANDS = {"serve": serve_cmd, "attach": attach_cmd, "detach": detach_cmd, "list": list_cmd}


def main(argv: list[str] | None = None) -> int:
    return run_main(COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
