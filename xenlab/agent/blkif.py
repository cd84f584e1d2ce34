"""The blkif wire format (Xen's public/io/blkif.h) for the x86_64 ABI, and
the XenStore keys a block backend and frontend exchange. Pure encoding: no
grants, no event channels; the backend is blkback.py.

Layouts on x86_64 (byte offsets). Xen's header declares naturally aligned
structs; Linux's copy (include/xen/interface/io/blkif.h) declares them
packed, as `u8 operation` followed by a union, with explicit `_pad` fields
so that the offsets come out the same (`offsetof(blkif_request, u.rw.id) ==
8`). Checked by compiling a probe against Linux 6.1's header:

  request, every variant 112 bytes (the size of its largest member, rw)
    0 operation u8          (all variants)
    8 id u64                (all variants, echoed in the response)
    rw (READ, WRITE, WRITE_BARRIER, FLUSH_DISKCACHE):
      1 nr_segments u8, 2 handle u16, 16 sector_number u64,
      24 seg[11], 8 bytes each: 0 gref u32, 4 first_sect u8, 5 last_sect u8
    discard: 1 flag u8, 2 handle u16, 16 sector_number u64, 24 nr_sectors u64
    indirect: 1 indirect_op u8, 2 nr_segments u16, 16 sector_number u64,
      24 handle u16, 28 indirect_grefs[8] u32 (ends at 60, padded to 64)
    other (any other operation): nothing but operation and id
  response, 16 bytes: 0 id u64, 8 operation u8, 10 status s16

Sectors (sector_number, first_sect, last_sect, nr_sectors) count 512-byte
units unless the frontend announced feature-large-sector-size."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import AgentError
from .grant import PAGE
from .ring import ring_size

# -- operations and statuses --------------------------------------------------
BLKIF_OP_READ = 0
BLKIF_OP_WRITE = 1
BLKIF_OP_WRITE_BARRIER = 2
BLKIF_OP_FLUSH_DISKCACHE = 3
BLKIF_OP_RESERVED_1 = 4  # kept for SLES' device-specific packets; a backend answers EOPNOTSUPP
BLKIF_OP_DISCARD = 5
BLKIF_OP_INDIRECT = 6
OP_NAMES = {
    BLKIF_OP_READ: "read", BLKIF_OP_WRITE: "write", BLKIF_OP_WRITE_BARRIER: "write-barrier",
    BLKIF_OP_FLUSH_DISKCACHE: "flush-diskcache", BLKIF_OP_RESERVED_1: "reserved-1",
    BLKIF_OP_DISCARD: "discard", BLKIF_OP_INDIRECT: "indirect",
}
# Operations laid out as the rw variant (flush and barrier may carry no segments).
RW_OPS = (BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE)

BLKIF_RSP_OKAY = 0
BLKIF_RSP_ERROR = -1
BLKIF_RSP_EOPNOTSUPP = -2

BLKIF_DISCARD_SECURE = 1  # discard's flag; honoured only if the backend set discard-secure

# `info` bits the backend publishes.
VDISK_CDROM = 0x1
VDISK_REMOVABLE = 0x2
VDISK_READONLY = 0x4

# -- sizes and limits ------------------------------------------------------------
BLKIF_MAX_SEGMENTS_PER_REQUEST = 11  # what fits a 112-byte request
BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST = 8
SECTOR_SIZE = 512
SECTORS_PER_PAGE = PAGE // SECTOR_SIZE  # so first_sect/last_sect lie in 0..7

SEGMENT = struct.Struct("<IBB2x")
RW_HEAD = struct.Struct("<BBH4xQQ")  # then the segments, at 24
DISCARD = struct.Struct("<BBH4xQQQ")
INDIRECT = struct.Struct(f"<BBH4xQQH2x{BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST}I4x")
OTHER = struct.Struct("<B7xQ")
RESPONSE = struct.Struct("<QBxh4x")

REQUEST_SIZE = RW_HEAD.size + BLKIF_MAX_SEGMENTS_PER_REQUEST * SEGMENT.size  # 112
RESPONSE_SIZE = RESPONSE.size  # 16
RING_ENTRY_SIZE = max(REQUEST_SIZE, RESPONSE_SIZE)  # a slot is the union of both
SEGMENTS_PER_INDIRECT_PAGE = PAGE // SEGMENT.size  # 512
MAX_INDIRECT_SEGMENTS = BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * SEGMENTS_PER_INDIRECT_PAGE  # 4096, the format's own bound

# Linux's XENBUS_MAX_RING_GRANT_ORDER (include/xen/xenbus.h): blkfront and
# blkback cap ring-page-order at it; blkif.h itself sets no bound.
LINUX_MAX_RING_PAGE_ORDER = 4


def ring_slots(order: int) -> int:
    """Requests a ring of 2**order pages holds (io/ring.h's __RING_SIZE)."""
    if order < 0:
        raise ValueError(f"ring page order {order} is negative")
    return ring_size(PAGE << order, RING_ENTRY_SIZE)


def indirect_pages(nr_segments: int) -> int:
    """Indirect pages that carry nr_segments segments (rounded up)."""
    return -(-nr_segments // SEGMENTS_PER_INDIRECT_PAGE)


# -- XenStore keys ------------------------------------------------------------------
# The backend publishes, in its directory:
FEATURE_BARRIER = "feature-barrier"
FEATURE_FLUSH_CACHE = "feature-flush-cache"
FEATURE_DISCARD = "feature-discard"
FEATURE_PERSISTENT = "feature-persistent"  # the frontend writes it in its own directory too
FEATURE_MAX_INDIRECT_SEGMENTS = "feature-max-indirect-segments"  # absent: no BLKIF_OP_INDIRECT
MAX_RING_PAGE_ORDER = "max-ring-page-order"
MULTI_QUEUE_MAX_QUEUES = "multi-queue-max-queues"
DISCARD_GRANULARITY = "discard-granularity"
DISCARD_ALIGNMENT = "discard-alignment"
DISCARD_SECURE = "discard-secure"
SECTORS = "sectors"  # disk size in sector-size units
SECTOR_SIZE_KEY = "sector-size"
PHYSICAL_SECTOR_SIZE = "physical-sector-size"
INFO = "info"  # VDISK_* bits
# The toolstack writes, for the backend (private to it):
MODE = "mode"  # "r" or "w"
PARAMS = "params"
PHYSICAL_DEVICE = "physical-device"
# The frontend publishes, in its directory:
RING_REF = "ring-ref"  # a one-page ring; ring-ref0.. (ring_ref_keys) for more pages
RING_PAGE_ORDER = "ring-page-order"
EVENT_CHANNEL = "event-channel"
PROTOCOL = "protocol"
MULTI_QUEUE_NUM_QUEUES = "multi-queue-num-queues"  # 2 or more: rings under queue-N/
FEATURE_LARGE_SECTOR_SIZE = "feature-large-sector-size"
VIRTUAL_DEVICE = "virtual-device"
DEVICE_TYPE = "device-type"  # "disk", "cdrom"
# A missing `protocol` means the frontend's native ABI: x86_64 for the guests here.
PROTOCOL_X86_64 = "x86_64-abi"  # io/protocols.h; the x86_32-abi layout differs and is not handled


def ring_ref_keys(order: int) -> list[str]:
    """The frontend's grant ref keys for a ring of 2**order pages."""
    return [RING_REF] if order == 0 else [f"{RING_REF}{i}" for i in range(1 << order)]


XVD_MAJOR = 202  # Xen's vbd numbering (xen/docs/misc/vbd-interface.txt): xvd disks 0..15 are (202 << 8) | (disk << 4)


def xvd_devid(name: str) -> int:
    """The vbd device id (XenStore devid, `virtual-device`) of xvda..xvdp."""
    if len(name) != 4 or not name.startswith("xvd") or not "a" <= name[3] <= "p":
        raise BlkifError(f"{name!r} is not a whole-disk xvd name", "use xvdb .. xvdp")
    return (XVD_MAJOR << 8) | ((ord(name[3]) - ord("a")) << 4)


# -- requests and responses ------------------------------------------------------------
class BlkifError(AgentError):
    pass


class BadRequest(BlkifError):
    """A request the format cannot hold; id and operation let the backend
    answer it with BLKIF_RSP_ERROR instead of dropping it."""

    def __init__(self, message: str, request_id: int, operation: int):
        super().__init__(message, "the frontend is broken or hostile; answer BLKIF_RSP_ERROR")
        self.request_id, self.operation = request_id, operation


def _slot(body: bytes) -> bytes:
    # Always a whole slot, so no stale bytes of an earlier request survive.
    return body + bytes(REQUEST_SIZE - len(body))


def _need(data: bytes, size: int, what: str) -> None:
    if len(data) < size:
        raise BlkifError(f"{what} needs {size} bytes, got {len(data)}")


@dataclass(frozen=True)
class Segment:
    """One page of a transfer: sectors first_sect..last_sect (inclusive) of page `gref`."""
    gref: int
    first_sect: int = 0
    last_sect: int = SECTORS_PER_PAGE - 1

    def valid(self) -> bool:
        return 0 <= self.first_sect <= self.last_sect < SECTORS_PER_PAGE

    @property
    def sectors(self) -> int:
        return self.last_sect - self.first_sect + 1

    def pack(self) -> bytes:
        return SEGMENT.pack(self.gref, self.first_sect, self.last_sect)

    @classmethod
    def unpack(cls, data: bytes, offset: int = 0) -> Segment:
        return cls(*SEGMENT.unpack_from(data, offset))


@dataclass(frozen=True)
class ReadWriteRequest:
    operation: int  # one of RW_OPS
    id: int
    sector_number: int
    segments: tuple[Segment, ...] = ()
    handle: int = 0

    def pack(self) -> bytes:
        if len(self.segments) > BLKIF_MAX_SEGMENTS_PER_REQUEST:
            raise BlkifError(f"{len(self.segments)} segments do not fit a request (at most {BLKIF_MAX_SEGMENTS_PER_REQUEST}; use indirect)")
        head = RW_HEAD.pack(self.operation, len(self.segments), self.handle, self.id, self.sector_number)
        return _slot(head + b"".join(s.pack() for s in self.segments))

    @classmethod
    def unpack(cls, data: bytes) -> ReadWriteRequest:
        _need(data, REQUEST_SIZE, "a request")
        op, nr, handle, id_, sector = RW_HEAD.unpack_from(data)
        if nr > BLKIF_MAX_SEGMENTS_PER_REQUEST:
            raise BadRequest(f"request {id_:#x} ({OP_NAMES.get(op, op)}) claims {nr} segments, more than {BLKIF_MAX_SEGMENTS_PER_REQUEST}", id_, op)
        segments = tuple(Segment.unpack(data, RW_HEAD.size + i * SEGMENT.size) for i in range(nr))
        return cls(op, id_, sector, segments, handle)


@dataclass(frozen=True)
class DiscardRequest:
    id: int
    sector_number: int
    nr_sectors: int
    flag: int = 0  # BLKIF_DISCARD_SECURE or 0
    handle: int = 0
    operation = BLKIF_OP_DISCARD

    def pack(self) -> bytes:
        return _slot(DISCARD.pack(BLKIF_OP_DISCARD, self.flag, self.handle, self.id, self.sector_number, self.nr_sectors))

    @classmethod
    def unpack(cls, data: bytes) -> DiscardRequest:
        _need(data, REQUEST_SIZE, "a request")
        _, flag, handle, id_, sector, count = DISCARD.unpack_from(data)
        return cls(id_, sector, count, flag, handle)


@dataclass(frozen=True)
class IndirectRequest:
    """Segments live in separate granted pages (indirect_grefs), 512 a page."""
    indirect_op: int  # BLKIF_OP_READ or BLKIF_OP_WRITE, checked by the backend
    id: int
    sector_number: int
    nr_segments: int
    indirect_grefs: tuple[int, ...]  # exactly indirect_pages(nr_segments) of them
    handle: int = 0
    operation = BLKIF_OP_INDIRECT

    def pack(self) -> bytes:
        if len(self.indirect_grefs) != indirect_pages(self.nr_segments) or len(self.indirect_grefs) > BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST:
            raise BlkifError(f"{self.nr_segments} indirect segments need {indirect_pages(self.nr_segments)} indirect pages "
                             f"(at most {BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST}), got {len(self.indirect_grefs)} grant refs")
        grefs = tuple(self.indirect_grefs) + (0,) * (BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST - len(self.indirect_grefs))
        return _slot(INDIRECT.pack(BLKIF_OP_INDIRECT, self.indirect_op, self.nr_segments, self.id, self.sector_number, self.handle, *grefs))

    @classmethod
    def unpack(cls, data: bytes) -> IndirectRequest:
        _need(data, REQUEST_SIZE, "a request")
        _, iop, nr, id_, sector, handle, *grefs = INDIRECT.unpack_from(data)
        pages = indirect_pages(nr)
        if pages > BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST:
            raise BadRequest(f"indirect request {id_:#x} claims {nr} segments, more than {MAX_INDIRECT_SEGMENTS} "
                             f"({BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST} pages)", id_, BLKIF_OP_INDIRECT)
        return cls(iop, id_, sector, nr, tuple(grefs[:pages]), handle)


@dataclass(frozen=True)
class OtherRequest:
    """An operation this module has no layout for: only its id is meaningful."""
    operation: int
    id: int

    def pack(self) -> bytes:
        return _slot(OTHER.pack(self.operation, self.id))

    @classmethod
    def unpack(cls, data: bytes) -> OtherRequest:
        _need(data, REQUEST_SIZE, "a request")
        return cls(*OTHER.unpack_from(data))


Request = ReadWriteRequest | DiscardRequest | IndirectRequest | OtherRequest


def unpack_request(data: bytes) -> Request:
    """Decode one ring slot by its operation byte (take a private copy of the slot first)."""
    _need(data, REQUEST_SIZE, "a request")
    op = data[0]
    if op in RW_OPS:
        return ReadWriteRequest.unpack(data)
    if op == BLKIF_OP_DISCARD:
        return DiscardRequest.unpack(data)
    if op == BLKIF_OP_INDIRECT:
        return IndirectRequest.unpack(data)
    return OtherRequest.unpack(data)


@dataclass(frozen=True)
class Response:
    id: int
    operation: int
    status: int = BLKIF_RSP_OKAY

    def pack(self) -> bytes:
        return RESPONSE.pack(self.id, self.operation, self.status)

    @classmethod
    def unpack(cls, data: bytes) -> Response:
        _need(data, RESPONSE_SIZE, "a response")
        return cls(*RESPONSE.unpack_from(data))


def pack_indirect_pages(segments: list[Segment] | tuple[Segment, ...]) -> list[bytes]:
    """The contents of the indirect pages for `segments`, one full page each."""
    pages = []
    for start in range(0, len(segments), SEGMENTS_PER_INDIRECT_PAGE):
        body = b"".join(s.pack() for s in segments[start: start + SEGMENTS_PER_INDIRECT_PAGE])
        pages.append(body + bytes(PAGE - len(body)))
    return pages


def unpack_indirect_segments(pages: list[bytes], nr_segments: int) -> tuple[Segment, ...]:
    """The first nr_segments segments spread over the mapped indirect pages."""
    if indirect_pages(nr_segments) > len(pages):
        raise BlkifError(f"{nr_segments} segments need {indirect_pages(nr_segments)} indirect pages, got {len(pages)}")
    return tuple(Segment.unpack(pages[i // SEGMENTS_PER_INDIRECT_PAGE], (i % SEGMENTS_PER_INDIRECT_PAGE) * SEGMENT.size)
                 for i in range(nr_segments))
