"""A shared request/response ring with the layout and rules of Xen's
public/io/ring.h, over any writable buffer (a granted page).

Layout: a 64-byte header -- u32 req_prod, req_event, rsp_prod, rsp_event,
then 4 bytes `pvt` left to the protocol and 44 bytes of padding -- followed
by RING_SIZE fixed-size entries, RING_SIZE the largest power of two that fits.

Rules kept here:
- indices are free-running u32 counters; a slot is `index & (size - 1)`, so
  both the slot position and the 2**32 counter wrap need no special case;
- the frontend writes only req_prod and rsp_event (and request slots in its
  free region), the backend only rsp_prod and req_event (and the slots of
  requests it has consumed, where its responses go);
- a producer notifies the peer only if the peer's event threshold lies in
  the range of indices just published (RING_PUSH_*_AND_CHECK_NOTIFY), and a
  consumer that runs dry sets its threshold to cons + 1 and looks once more
  before sleeping (RING_FINAL_CHECK_FOR_*), so no wake-up is lost;
- the peer's producer index is untrusted: a value more than RING_SIZE ahead
  of what we can have handed out is rejected (RING_REQUEST_PROD_OVERFLOW),
  so garbage indices never make us read outside the ring or loop forever.

Python stores a 4-byte aligned field with one machine store through a
memoryview cast to 'I'. x86 keeps stores in order and loads in order, so
wmb/rmb are no-ops here, as in Linux; the one barrier that matters, between
publishing our index and reading the peer's threshold, is a locked
instruction (taking a lock)."""

from __future__ import annotations

import threading

from .errors import AgentError

HEADER_SIZE = 64
PVT_OFFSET = 16  # io/ring.h's per-protocol `pvt` bytes
MASK32 = 0xFFFFFFFF
REQ_PROD, REQ_EVENT, RSP_PROD, RSP_EVENT = range(4)

_barrier = threading.Lock()


def mb() -> None:
    """Full memory barrier: acquiring a lock is a locked (serialising) instruction on x86."""
    _barrier.acquire()
    _barrier.release()


class RingError(AgentError):
    pass


def ring_size(buffer_bytes: int, entry_size: int) -> int:
    """__RING_SIZE: entries that fit after the header, rounded down to a power of two."""
    if entry_size <= 0:
        raise ValueError("entry size must be positive")
    n = (buffer_bytes - HEADER_SIZE) // entry_size
    if n < 1:
        raise ValueError(f"a {buffer_bytes}-byte ring has no room for {entry_size}-byte entries")
    return 1 << (n.bit_length() - 1)


def dist(a: int, b: int) -> int:
    """(a - b) as RING_IDX arithmetic: how far a is ahead of b, modulo 2**32."""
    return (a - b) & MASK32


class SharedRing:
    """The shared part: header indices and entry slots over `buf`."""

    def __init__(self, buf, entry_size: int, size_bytes: int | None = None):
        self.mv = memoryview(buf)
        nbytes = size_bytes if size_bytes is not None else len(self.mv)
        self.entry_size = entry_size
        self.size = ring_size(nbytes, entry_size)
        self.idx = self.mv[:16].cast("I")

    def init(self, start: int = 0) -> None:
        """SHARED_RING_INIT, optionally at a start index (to exercise the u32 wrap)."""
        start &= MASK32
        self.idx[REQ_PROD] = start
        self.idx[RSP_PROD] = start
        self.idx[REQ_EVENT] = (start + 1) & MASK32
        self.idx[RSP_EVENT] = (start + 1) & MASK32

    def slot(self, index: int) -> int:
        return HEADER_SIZE + (index & (self.size - 1)) * self.entry_size

    def read(self, index: int) -> bytes:
        off = self.slot(index)
        return bytes(self.mv[off: off + self.entry_size])  # a private copy: the peer may change the slot

    def write(self, index: int, data: bytes) -> None:
        if len(data) > self.entry_size:
            raise RingError(f"entry of {len(data)} bytes does not fit a {self.entry_size}-byte slot")
        off = self.slot(index)
        self.mv[off: off + len(data)] = data

    def header(self) -> dict:
        return {"req_prod": self.idx[REQ_PROD], "req_event": self.idx[REQ_EVENT], "rsp_prod": self.idx[RSP_PROD], "rsp_event": self.idx[RSP_EVENT]}

    def release(self) -> None:
        self.idx.release()
        self.mv.release()


class FrontRing:
    """The frontend's view: produces requests, consumes responses."""

    def __init__(self, sring: SharedRing, start: int | None = None):
        self.s = sring
        self.size = sring.size
        # FRONT_RING_ATTACH: pick up where the shared indices are.
        base = sring.idx[REQ_PROD] if start is None else start & MASK32
        self.req_prod_pvt = base
        self.rsp_cons = base

    def free_requests(self) -> int:
        return self.size - dist(self.req_prod_pvt, self.rsp_cons)

    def full(self) -> bool:
        return self.free_requests() == 0

    def put_request(self, data: bytes) -> int:
        if self.full():
            raise RingError(f"ring full: {self.size} requests outstanding", "wait for responses before queueing more")
        index = self.req_prod_pvt
        self.s.write(index, data)
        self.req_prod_pvt = (index + 1) & MASK32
        return index

    def push_requests(self) -> bool:
        """Publish queued requests; True if the backend asked to be notified."""
        old = self.s.idx[REQ_PROD]
        new = self.req_prod_pvt
        self.s.idx[REQ_PROD] = new  # wmb is implied on x86: slot stores happened first
        mb()
        return dist(new, self.s.idx[REQ_EVENT]) < dist(new, old)

    def unconsumed_responses(self) -> int:
        prod = self.s.idx[RSP_PROD]
        ahead = dist(prod, self.rsp_cons)
        if ahead > dist(self.req_prod_pvt, self.rsp_cons):
            raise RingError(
                f"backend published rsp_prod={prod} but only {dist(self.req_prod_pvt, self.rsp_cons)} requests are outstanding "
                f"(rsp_cons={self.rsp_cons}): garbage index", "the backend is broken or hostile; close the device",
            )
        return ahead

    def get_response(self) -> bytes:
        data = self.s.read(self.rsp_cons)
        self.rsp_cons = (self.rsp_cons + 1) & MASK32
        return data

    def final_check_for_responses(self) -> bool:
        """Before sleeping: ask for an event at the next response, then look again."""
        if self.unconsumed_responses():
            return True
        self.s.idx[RSP_EVENT] = (self.rsp_cons + 1) & MASK32
        mb()
        return self.unconsumed_responses() > 0


class BackRing:
    """The backend's view: consumes requests, produces responses."""

    def __init__(self, sring: SharedRing, start: int | None = None):
        self.s = sring
        self.size = sring.size
        # BACK_RING_ATTACH at the frontend's initial rsp_prod (0 for SHARED_RING_INIT).
        base = sring.idx[RSP_PROD] if start is None else start & MASK32
        self.rsp_prod_pvt = base
        self.req_cons = base
        self.max_unconsumed = 0

    def unconsumed_requests(self) -> int:
        prod = self.s.idx[REQ_PROD]
        # RING_REQUEST_PROD_OVERFLOW: the frontend cannot have more than a
        # ring's worth of requests without responses.
        if dist(prod, self.rsp_prod_pvt) > self.size:
            raise RingError(
                f"frontend published req_prod={prod}, {dist(prod, self.rsp_prod_pvt)} ahead of rsp_prod={self.rsp_prod_pvt} "
                f"on a {self.size}-slot ring: garbage index", "the frontend is broken or hostile; the backend closes the device",
            )
        req = dist(prod, self.req_cons)
        rsp = self.size - dist(self.req_cons, self.rsp_prod_pvt)
        n = min(req, rsp)
        self.max_unconsumed = max(self.max_unconsumed, n)
        return n

    def get_request(self) -> bytes:
        if dist(self.req_cons, self.rsp_prod_pvt) >= self.size:  # RING_REQUEST_CONS_OVERFLOW
            raise RingError("request consumer ran a ring ahead of the responses")
        data = self.s.read(self.req_cons)
        self.req_cons = (self.req_cons + 1) & MASK32
        return data

    def put_response(self, data: bytes) -> int:
        if dist(self.req_cons, self.rsp_prod_pvt) == 0:
            raise RingError("no consumed request to respond to")
        index = self.rsp_prod_pvt
        self.s.write(index, data)
        self.rsp_prod_pvt = (index + 1) & MASK32
        return index

    def push_responses(self) -> bool:
        old = self.s.idx[RSP_PROD]
        new = self.rsp_prod_pvt
        self.s.idx[RSP_PROD] = new
        mb()
        return dist(new, self.s.idx[RSP_EVENT]) < dist(new, old)

    def final_check_for_requests(self) -> bool:
        if self.unconsumed_requests():
            return True
        self.s.idx[REQ_EVENT] = (self.req_cons + 1) & MASK32
        mb()
        return self.unconsumed_requests() > 0


def main(argv: list[str] | None = None) -> int:
    """`selftest`: a front and a back ring on one anonymous shared mapping, in two processes."""
    import mmap
    import os
    import struct
    import time

    from .cmdline import run_main

    def selftest(count: int = 10000, start: int = 0xFFFFFF00):
        buf = mmap.mmap(-1, 4096)
        s = SharedRing(buf, 16)
        s.init(start)
        pid = os.fork()
        if pid == 0:  # backend: echo each request's counter back, spinning (no event channel here)
            back = BackRing(SharedRing(buf, 16))
            done = 0
            while done < count:
                while back.unconsumed_requests():
                    (n,) = struct.unpack_from("=Q", back.get_request())
                    back.put_response(struct.pack("=Q", n * 3))
                    done += 1
                back.push_responses()
            os._exit(0)
        front = FrontRing(s)
        sent = got = 0
        t0 = time.monotonic()
        while got < count:
            while sent < count and not front.full():
                front.put_request(struct.pack("=Q", sent))
                sent += 1
            front.push_requests()
            while front.unconsumed_responses():
                (v,) = struct.unpack_from("=Q", front.get_response())
                if v != got * 3:
                    raise RingError(f"response {got} carried {v}")
                got += 1
        os.waitpid(pid, 0)
        return {"count": count, "start": start, "end": s.header(), "seconds": round(time.monotonic() - t0, 3)}

    return run_main({"selftest": selftest}, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
