"""How the Python block backend serves one request (blkback.py runs the
ring and the handshake): reads and writes of the disk file through the
frontend's granted pages (persistent ones kept mapped, the rest mapped per
request), indirect segments, flush and discard, with the io-error and
unmappable-grant faults of a fault plan."""

from __future__ import annotations

import ctypes
import os

from .blkattach import BlkbackError
from .blkif import (
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    OP_NAMES,
    SECTOR_SIZE,
    SECTORS_PER_PAGE,
    SEGMENT,
    DiscardRequest,
    IndirectRequest,
    ReadWriteRequest,
)
from .faultplan import Fault
from .grant import PAGE, GrantMapper

MAX_INDIRECT_SEGMENTS = 256  # what we offer (kernel blkback's default); blkfront caps it at its own 32
MAX_PERSISTENT_GRANTS = 1056  # kernel blkback's default: beyond it, grants are mapped per request
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


class BlockRequests:
    """The request half of BlockBackend (which sets these attributes)."""

    domid: int
    fd: int
    sectors: int
    readonly: bool
    mapper: GrantMapper
    persistent: dict[int, tuple]
    use_persistent: bool
    faults: dict[str, Fault]
    io_errors: list[Fault]
    stats: dict[str, int]
    counts: dict[str, int]

    def fire(self, name: str, **data) -> None:
        raise NotImplementedError  # BlockBackend's: counted and logged

    def _serve(self, req) -> int:
        if isinstance(req, DiscardRequest):
            return self._discard(req)
        if isinstance(req, IndirectRequest):
            self.stats["indirect"] += 1
            if req.indirect_op not in (BLKIF_OP_READ, BLKIF_OP_WRITE):
                raise BlkbackError(f"indirect request with operation {req.indirect_op}")
            if not 0 < req.nr_segments <= MAX_INDIRECT_SEGMENTS:
                raise BlkbackError(f"indirect request with {req.nr_segments} segments (1..{MAX_INDIRECT_SEGMENTS})")
            segments = self._indirect_segments(req)
            return self._rw(req.indirect_op, req.sector_number, segments)
        if isinstance(req, ReadWriteRequest):
            segments = [(s.gref, s.first_sect, s.last_sect) for s in req.segments]
            if req.operation == BLKIF_OP_FLUSH_DISKCACHE:
                status = self._rw(BLKIF_OP_WRITE, req.sector_number, segments) if segments else BLKIF_RSP_OKAY
                if status == BLKIF_RSP_OKAY:
                    os.fsync(self.fd)
                    self.stats["flushes"] += 1
                return status
            if req.operation in (BLKIF_OP_READ, BLKIF_OP_WRITE):
                if not req.segments:
                    raise BlkbackError(f"{OP_NAMES[req.operation]} with no segments")
                return self._rw(req.operation, req.sector_number, segments)
        return BLKIF_RSP_EOPNOTSUPP  # write-barrier (not offered), reserved-1, unknown operations

    def _check_range(self, sector: int, count: int, what: str) -> None:
        if sector < 0 or count < 0 or sector + count > self.sectors:
            raise BlkbackError(f"{what} of sectors {sector}..{sector + count - 1} beyond the disk's {self.sectors}")

    def _rw(self, op: int, sector: int, segments: list[tuple[int, int, int]]) -> int:
        """segments: (gref, first_sect, last_sect) each; plain tuples, as an
        indirect request carries hundreds and this is the hot path."""
        write = op == BLKIF_OP_WRITE
        if write and self.readonly:
            raise BlkbackError("write to a read-only disk")
        count = 0
        for _, first, last in segments:
            if not 0 <= first <= last < SECTORS_PER_PAGE:
                raise BlkbackError(f"segment sectors {first}..{last} outside a page (0..{SECTORS_PER_PAGE - 1})")
            count += last - first + 1
        self._check_range(sector, count, OP_NAMES[op])
        self.stats["max_segments"] = max(self.stats["max_segments"], len(segments))
        self.counts["data_requests"] += 1
        for io_error in self.io_errors:
            if io_error.matches(op, sector, count):
                self.fire("io-error", op=OP_NAMES[op], sector=sector, sectors=count)
                return BLKIF_RSP_ERROR
        fault = self.faults.get("unmappable-grant")
        if fault and fault.fires(self.counts["data_requests"]):
            self.fire("unmappable-grant", grefs=[s[0] for s in segments][:4])
            return BLKIF_RSP_ERROR
        pages, release = self._pages([s[0] for s in segments], writable=not write)
        views = [pages[gref][first * SECTOR_SIZE:(last + 1) * SECTOR_SIZE] for gref, first, last in segments]
        try:
            offset = sector * SECTOR_SIZE
            if write:
                done = os.pwritev(self.fd, views, offset)
                self.stats["bytes_written"] += done
            else:
                done = os.preadv(self.fd, views, offset)
                self.stats["bytes_read"] += done
            if done != count * SECTOR_SIZE:
                raise BlkbackError(f"short {OP_NAMES[op]}: {done} of {count * SECTOR_SIZE} bytes")
        finally:
            for view in views:
                view.release()
            release()
        return BLKIF_RSP_OKAY

    def _pages(self, grefs: list[int], writable: bool):
        """gref -> memoryview of its page: persistent ones from the cache
        (mapped on first use), the rest mapped now in one call; and what
        releases them (unmapping the non-persistent ones)."""
        pages: dict[int, memoryview] = {}
        mapping = whole = None

        def release() -> None:
            if whole is not None:
                for gref in rest:
                    pages[gref].release()
                whole.release()
                self.mapper.unmap(*mapping)
        rest: list[int] = []
        try:
            if self.use_persistent:
                cache = self.persistent
                for gref in grefs:
                    if gref not in cache and len(cache) < MAX_PERSISTENT_GRANTS:
                        # blkfront's persistent grants are always read-write.
                        index, m = self.mapper.map(self.domid, [gref], writable=True)
                        cache[gref] = (index, m, memoryview(m))
                        self.stats["persistent_grants"] = len(cache)
                    if gref in cache:
                        pages[gref] = cache[gref][2]
            rest = [g for g in dict.fromkeys(grefs) if g not in pages]
            if rest:
                mapping = self.mapper.map(self.domid, rest, writable=writable)
                self.stats["grants_mapped"] += len(rest)
                whole = memoryview(mapping[1])
                for i, gref in enumerate(rest):
                    pages[gref] = whole[i * PAGE:(i + 1) * PAGE]
        except BaseException:
            release()
            raise
        return pages, release

    def _indirect_segments(self, req: IndirectRequest) -> list[tuple[int, int, int]]:
        pages, release = self._pages(list(req.indirect_grefs), writable=False)
        try:
            raw = b"".join(bytes(pages[g]) for g in req.indirect_grefs)  # a private copy: the frontend may change it
        finally:
            release()
        return list(SEGMENT.iter_unpack(raw[:req.nr_segments * SEGMENT.size]))

    def _discard(self, req: DiscardRequest) -> int:
        if self.readonly:
            raise BlkbackError("discard on a read-only disk")
        self._check_range(req.sector_number, req.nr_sectors, "discard")
        for fault in self.io_errors:
            if fault.matches(BLKIF_OP_DISCARD, req.sector_number, req.nr_sectors):
                self.fire("io-error", op="discard", sector=req.sector_number, sectors=req.nr_sectors)
                return BLKIF_RSP_ERROR
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
        if libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, req.sector_number * SECTOR_SIZE, req.nr_sectors * SECTOR_SIZE):
            raise BlkbackError(f"discard (punch hole) failed: {os.strerror(ctypes.get_errno())}")
        self.stats["discards"] += 1
        return BLKIF_RSP_OKAY
