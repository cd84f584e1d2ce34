"""A hostile block frontend, run in a domU against dom0's kernel blkback:
`python3 -m xenlab_agent.hostile run --devid N --attacks a,b,c`.

It does the XenBus handshake of a vbd the guest's own blkfront does not
drive (the guest is created with `--no-stock xen-blkfront`), then sends
requests no honest blkfront sends and records what came back. ATTACKS lists
each with what blkback must do; `valid-read` is the control, run first and
last, showing the ring still serves honest requests after the refusals.
`lying-req-prod` ends the session (blkback halts the ring), so it goes last.

The result: per attack, the response status (or none within the timeout)
and whether it matched the expectation."""

from __future__ import annotations

import time

from .blkif import (
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    EVENT_CHANNEL,
    PROTOCOL,
    PROTOCOL_X86_64,
    RING_ENTRY_SIZE,
    RING_REF,
    SECTORS,
    ReadWriteRequest,
    Response,
    Segment,
)
from .errors import AgentError
from .evtchn import EventChannel
from .facts import CLOSED, CLOSING, CONNECTED, INITIALISED, INITWAIT, state_name
from .grant import PAGE, SharedPages
from .ring import MASK32, REQ_PROD, FrontRing, SharedRing
from .xs import XenStore, XsError

DATA_PAGES = 4
NO_RESPONSE = "none"
# attack -> what blkback must answer ("error", "okay", or "none": no response at all)
ATTACKS = {
    "valid-read": ("okay", "an honest one-page read succeeds"),
    "beyond-disk": ("error", "a read of the sector just past the disk's end is refused"),
    "wrapping-sector": ("error", "a read whose sector number wraps past 2**64 is refused"),
    "zero-segments": ("error", "a read with no segments is refused"),
    "too-many-segments": ("error", "a read claiming 12 segments (more than 11 fit) is refused"),
    "bad-sector-offsets": ("error", "a segment with first_sect > last_sect is refused"),
    "sector-past-page": ("error", "a segment ending at sector 8 of a 4 KiB page is refused"),
    "foreign-grant": ("error", "a grant ref this domain never granted is refused (not mapped)"),
    "unknown-operation": ("eopnotsupp", "an operation blkif does not define is answered BLKIF_RSP_EOPNOTSUPP"),
    "write-readonly": ("error", "a write to a read-only disk is refused"),
    "event-storm": ("okay", "20000 events with no requests change nothing; the next honest read succeeds"),
    "lying-req-prod": (NO_RESPONSE, "req_prod a ring ahead of the responses: blkback stops serving the ring, no response"),
}
LAST_ATTACKS = ("lying-req-prod",)


class HostileError(AgentError):
    pass


class HostileFrontend:
    def __init__(self, devid: int, timeout: float):
        self.xs = XenStore()
        self.domid = int(self.xs.read("domid"))
        self.fe = f"device/vbd/{devid}"
        self.be = self.xs.try_read(f"{self.fe}/backend")
        if self.be is None:
            raise HostileError(f"no vbd {devid} in this domain", "create the guest with a disk, or attach one without connecting it")
        self.backend_id = int(self.xs.read(f"{self.fe}/backend-id"))
        self.timeout = timeout
        self.next_id = 1

    def connect(self) -> None:
        state = self.xs.wait_for(f"{self.be}/state", lambda v: int(v) >= INITWAIT, self.timeout, "blkback to reach InitWait")
        assert state is not None  # without gone_ok, wait_for returns the value or raises
        if int(state) != INITWAIT:
            raise HostileError(f"blkback is {state_name(state)}, not InitWait", "is the guest's own blkfront bound to the disk?")
        self.pages = SharedPages(self.backend_id, 1 + DATA_PAGES)
        self.sring = SharedRing(self.pages.map, RING_ENTRY_SIZE, PAGE)  # the first page; data pages follow
        self.sring.init()
        self.ring = FrontRing(self.sring)
        self.ev = EventChannel()
        self.port = self.ev.bind_unbound(self.backend_id)
        with self.xs.transaction() as tx:
            self.xs.write(f"{self.fe}/{RING_REF}", self.pages.refs[0], tx)
            self.xs.write(f"{self.fe}/{EVENT_CHANNEL}", self.port, tx)
            self.xs.write(f"{self.fe}/{PROTOCOL}", PROTOCOL_X86_64, tx)
            self.xs.write(f"{self.fe}/state", INITIALISED, tx)
        state = self.xs.wait_for(f"{self.be}/state", lambda v: int(v) >= CONNECTED, self.timeout, "blkback to reach Connected")
        assert state is not None  # without gone_ok, wait_for returns the value or raises
        if int(state) != CONNECTED:
            raise HostileError(f"blkback went {state_name(state)} instead of Connected")
        self.sectors = int(self.xs.read(f"{self.be}/{SECTORS}"))
        self.xs.write(f"{self.fe}/state", CONNECTED)

    def send(self, raw: bytes, timeout: float = 5.0) -> Response | None:
        """One request on the ring; its response, or None if none came in `timeout`."""
        self.ring.put_request(raw)
        if self.ring.push_requests():
            self.ev.notify(self.port)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ring.unconsumed_responses():
                return Response.unpack(self.ring.get_response())
            self.ev.wait(self.port, min(0.2, max(0.0, deadline - time.monotonic())))
        return None

    def request(self, op: int, sector: int, segments, nr_segments: int | None = None) -> bytes:
        rid, self.next_id = self.next_id, self.next_id + 1
        raw = bytearray(ReadWriteRequest(op, rid, sector, tuple(segments)).pack())
        if nr_segments is not None:
            raw[1] = nr_segments  # a count the segment list does not back
        return bytes(raw)

    def page(self, n: int) -> Segment:
        return Segment(self.pages.refs[1 + n], 0, 7)

    def attack(self, name: str) -> dict:
        if name == "event-storm":
            t0 = time.monotonic()
            for _ in range(20000):
                self.ev.notify(self.port)
            took = time.monotonic() - t0
            rsp = self.send(self.request(BLKIF_OP_READ, 0, [self.page(0)]))
            return {"storm_seconds": round(took, 2), **self._status(rsp)}
        if name == "lying-req-prod":
            self.sring.idx[REQ_PROD] = (self.ring.req_prod_pvt + self.ring.size + 7) & MASK32
            self.ev.notify(self.port)
            time.sleep(2)
            got = self.ring.unconsumed_responses()
            return {"status": NO_RESPONSE if got == 0 else f"{got} responses"}
        raw = {
            "valid-read": lambda: self.request(BLKIF_OP_READ, 0, [self.page(0)]),
            "beyond-disk": lambda: self.request(BLKIF_OP_READ, self.sectors, [Segment(self.pages.refs[1], 0, 0)]),
            "wrapping-sector": lambda: self.request(BLKIF_OP_READ, 0xFFFFFFFFFFFFFFFC, [self.page(0)]),
            "zero-segments": lambda: self.request(BLKIF_OP_READ, 0, []),
            "too-many-segments": lambda: self.request(BLKIF_OP_READ, 0, [self.page(i % DATA_PAGES) for i in range(11)], nr_segments=12),
            "bad-sector-offsets": lambda: self.request(BLKIF_OP_READ, 0, [Segment(self.pages.refs[1], 5, 2)]),
            "sector-past-page": lambda: self.request(BLKIF_OP_READ, 0, [Segment(self.pages.refs[1], 0, 8)]),
            "foreign-grant": lambda: self.request(BLKIF_OP_READ, 0, [Segment(self.pages.refs[-1] + 4000, 0, 7)]),
            "unknown-operation": lambda: self.request(0x77, 0, [self.page(0)]),
            "write-readonly": lambda: self.request(BLKIF_OP_WRITE, 0, [self.page(1)]),
        }[name]()
        return self._status(self.send(raw))

    @staticmethod
    def _status(rsp: Response | None) -> dict:
        if rsp is None:
            return {"status": NO_RESPONSE}
        names = {BLKIF_RSP_OKAY: "okay", BLKIF_RSP_ERROR: "error", BLKIF_RSP_EOPNOTSUPP: "eopnotsupp"}
        return {"status": names.get(rsp.status, f"status {rsp.status}"), "id": rsp.id}

    def close(self) -> str:
        """The orderly closedown from our side; the backend's final state."""
        try:
            self.xs.write(f"{self.fe}/state", CLOSING)
            self.xs.wait_for(f"{self.be}/state", lambda v: int(v) >= CLOSING, 15, "blkback to close", gone_ok=True)
            self.xs.write(f"{self.fe}/state", CLOSED)
            final = self.xs.wait_for(f"{self.be}/state", lambda v: int(v) == CLOSED, 15, "blkback to reach Closed", gone_ok=True)
        except XsError as e:
            final = f"never closed: {e.message}"
        for thing in ("ev", "pages"):
            obj = getattr(self, thing, None)
            if obj is not None:
                if thing == "pages":
                    self.sring.release()
                obj.close()
        return state_name(final) if final is None or str(final).isdigit() else str(final)


def run(devid: int = 51712, attacks: str = "", timeout: float = 30.0):
    """Connect to blkback as a frontend and run the attacks (comma-separated, default all that apply)."""
    names = [a for a in attacks.split(",") if a] or [a for a in ATTACKS if a != "write-readonly"]
    unknown = [a for a in names if a not in ATTACKS]
    if unknown:
        raise HostileError(f"unknown attack(s) {', '.join(unknown)}", f"known: {', '.join(ATTACKS)}")
    names = [a for a in names if a not in LAST_ATTACKS] + [a for a in names if a in LAST_ATTACKS]
    front = HostileFrontend(devid, timeout)
    front.connect()
    results = []
    try:
        for name in ["valid-read", *[a for a in names if a not in ("valid-read", *LAST_ATTACKS)], "valid-read",
                     *[a for a in names if a in LAST_ATTACKS]]:
            expected, what = ATTACKS[name]
            got = front.attack(name)
            results.append({"attack": name, "expected": expected, "what": what, **got, "ok": got["status"] == expected})
    finally:
        closed = front.close()
    return {"devid": devid, "sectors": front.sectors, "results": results, "backend_final_state": closed}


def main(argv: list[str] | None = None) -> int:
    from .cmdline import run_main

    return run_main({"run": run}, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
