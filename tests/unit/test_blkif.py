"""The blkif wire format against the x86_64 layout of Xen's io/blkif.h
(offsets as a C compiler lays out Linux 6.1's packed copy); no Xen needed."""

import struct

import pytest

from xenlab.agent import blkif
from xenlab.agent.blkif import (
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_RESERVED_1,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BadRequest,
    BlkifError,
    DiscardRequest,
    IndirectRequest,
    OtherRequest,
    ReadWriteRequest,
    Response,
    Segment,
    unpack_request,
)
from xenlab.agent.ring import HEADER_SIZE, SharedRing


def test_header_constants():
    assert (BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE) == (0, 1, 2, 3)
    assert (BLKIF_OP_RESERVED_1, BLKIF_OP_DISCARD, BLKIF_OP_INDIRECT) == (4, 5, 6)
    assert (blkif.BLKIF_RSP_OKAY, BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP) == (0, -1, -2)
    assert blkif.BLKIF_MAX_SEGMENTS_PER_REQUEST == 11
    assert blkif.BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST == 8
    assert blkif.BLKIF_DISCARD_SECURE == 1
    assert (blkif.VDISK_CDROM, blkif.VDISK_REMOVABLE, blkif.VDISK_READONLY) == (1, 2, 4)
    assert blkif.PROTOCOL_X86_64 == "x86_64-abi"


def test_sizes():
    assert blkif.SEGMENT.size == 8
    assert blkif.REQUEST_SIZE == 112
    assert blkif.RESPONSE_SIZE == 16
    assert blkif.RING_ENTRY_SIZE == 112
    assert blkif.DISCARD.size == 32
    assert blkif.INDIRECT.size == 64
    assert blkif.OTHER.size == 16
    assert blkif.SEGMENTS_PER_INDIRECT_PAGE == 512
    assert blkif.MAX_INDIRECT_SEGMENTS == 4096
    assert blkif.SECTORS_PER_PAGE == 8


def fields(data, layout):
    """Read (format, offset) pairs out of a packed slot."""
    return [struct.unpack_from("<" + fmt, data, off)[0] for fmt, off in layout]


def test_rw_offsets():
    segs = (Segment(0x11223344, 1, 6), Segment(0x55667788, 0, 7))
    data = ReadWriteRequest(BLKIF_OP_WRITE, 0x0102030405060708, 0x1122334455667788, segs, handle=0xABCD).pack()
    assert len(data) == 112
    # operation @0, nr_segments @1, handle @2, id @8, sector_number @16, seg[0] @24, seg[1] @32
    assert fields(data, [("B", 0), ("B", 1), ("H", 2), ("Q", 8), ("Q", 16)]) == [1, 2, 0xABCD, 0x0102030405060708, 0x1122334455667788]
    assert fields(data, [("I", 24), ("B", 28), ("B", 29), ("I", 32), ("B", 36), ("B", 37)]) == [0x11223344, 1, 6, 0x55667788, 0, 7]
    assert data[4:8] == bytes(4) and data[40:] == bytes(72)  # padding and unused segments are zero


def test_discard_offsets():
    data = DiscardRequest(7, 2048, 4096, flag=blkif.BLKIF_DISCARD_SECURE, handle=3).pack()
    # operation @0, flag @1, handle @2, id @8, sector_number @16, nr_sectors @24
    assert fields(data, [("B", 0), ("B", 1), ("H", 2), ("Q", 8), ("Q", 16), ("Q", 24)]) == [5, 1, 3, 7, 2048, 4096]
    assert len(data) == 112 and data[32:] == bytes(80)


def test_indirect_offsets():
    data = IndirectRequest(BLKIF_OP_READ, 9, 100, 513, (0xA0, 0xA1), handle=0x202).pack()
    # operation @0, indirect_op @1, nr_segments u16 @2, id @8, sector_number @16, handle @24, indirect_grefs @28
    assert fields(data, [("B", 0), ("B", 1), ("H", 2), ("Q", 8), ("Q", 16), ("H", 24)]) == [6, 0, 513, 9, 100, 0x202]
    assert struct.unpack_from("<8I", data, 28) == (0xA0, 0xA1, 0, 0, 0, 0, 0, 0)
    assert len(data) == 112 and data[60:] == bytes(52)


def test_other_and_response_offsets():
    data = OtherRequest(BLKIF_OP_RESERVED_1, 0xDEAD).pack()
    assert fields(data, [("B", 0), ("Q", 8)]) == [4, 0xDEAD] and len(data) == 112
    rsp = Response(0xFEEDFACE12345678, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_RSP_EOPNOTSUPP).pack()
    # id @0, operation @8, status s16 @10
    assert len(rsp) == 16
    assert fields(rsp, [("Q", 0), ("B", 8), ("h", 10)]) == [0xFEEDFACE12345678, 3, -2]


@pytest.mark.parametrize("request_", [
    ReadWriteRequest(BLKIF_OP_READ, 1, 0, (Segment(5),)),
    ReadWriteRequest(BLKIF_OP_WRITE, 2**64 - 1, 2**64 - 1, tuple(Segment(2**32 - 1 - i, i % 8, 7) for i in range(11)), handle=0xFFFF),
    ReadWriteRequest(BLKIF_OP_FLUSH_DISKCACHE, 3, 0),  # flush without data: no segments
    ReadWriteRequest(BLKIF_OP_WRITE_BARRIER, 4, 8, (Segment(9, 0, 0),)),
    DiscardRequest(5, 1 << 40, 1 << 20, flag=blkif.BLKIF_DISCARD_SECURE, handle=1),
    IndirectRequest(BLKIF_OP_WRITE, 6, 64, 12, (77,)),
    IndirectRequest(BLKIF_OP_READ, 7, 0, 4096, tuple(range(100, 108))),
    OtherRequest(BLKIF_OP_RESERVED_1, 8),
    OtherRequest(200, 9),
], ids=lambda r: f"{type(r).__name__}-{r.operation}")
def test_every_request_variant_round_trips(request_):
    data = request_.pack()
    assert len(data) == blkif.REQUEST_SIZE
    assert unpack_request(data) == request_
    assert type(request_).unpack(data) == request_


def test_response_round_trips():
    for rsp in (Response(1, BLKIF_OP_READ), Response(2**64 - 1, BLKIF_OP_INDIRECT, BLKIF_RSP_ERROR), Response(0, 255, -32768)):
        assert Response.unpack(rsp.pack()) == rsp


def test_hostile_requests_are_refused_with_their_id():
    data = bytearray(ReadWriteRequest(BLKIF_OP_READ, 0x42, 0).pack())
    data[1] = 12  # nr_segments past BLKIF_MAX_SEGMENTS_PER_REQUEST
    with pytest.raises(BadRequest) as e:
        unpack_request(bytes(data))
    assert (e.value.request_id, e.value.operation) == (0x42, BLKIF_OP_READ)
    data = bytearray(IndirectRequest(BLKIF_OP_READ, 0x43, 0, 1, (1,)).pack())
    struct.pack_into("<H", data, 2, 4097)  # a ninth indirect page
    with pytest.raises(BadRequest) as e:
        unpack_request(bytes(data))
    assert (e.value.request_id, e.value.operation) == (0x43, BLKIF_OP_INDIRECT)
    with pytest.raises(BlkifError):
        unpack_request(bytes(111))


def test_pack_refuses_what_does_not_fit():
    with pytest.raises(BlkifError):
        ReadWriteRequest(BLKIF_OP_READ, 1, 0, tuple(Segment(i) for i in range(12))).pack()
    with pytest.raises(BlkifError):
        IndirectRequest(BLKIF_OP_READ, 1, 0, 513, (1,)).pack()  # needs two indirect pages
    with pytest.raises(BlkifError):
        IndirectRequest(BLKIF_OP_READ, 1, 0, 4097, tuple(range(9))).pack()


def test_segment_sectors_and_validity():
    assert Segment(1).sectors == 8 and Segment(1).valid()
    assert Segment(1, 3, 3).sectors == 1
    assert not Segment(1, 4, 3).valid()
    assert not Segment(1, 0, 8).valid()


def test_indirect_pages_round_trip():
    assert [blkif.indirect_pages(n) for n in (0, 1, 512, 513, 4096)] == [0, 1, 1, 2, 8]
    segs = tuple(Segment(1000 + i, i % 8, 7) for i in range(600))
    pages = blkif.pack_indirect_pages(segs)
    assert [len(p) for p in pages] == [4096, 4096]
    assert struct.unpack_from("<IBB", pages[1], 0) == (1512, 0, 7)  # segment 512 opens the second page
    assert blkif.unpack_indirect_segments(pages, 600) == segs
    with pytest.raises(BlkifError):
        blkif.unpack_indirect_segments(pages[:1], 600)


@pytest.mark.parametrize("order,slots", [(0, 32), (1, 64), (2, 128), (3, 256)])
def test_ring_slots_per_order(order, slots):
    # __RING_SIZE: (pages * 4096 - 64) / 112 rounded down to a power of two
    assert blkif.ring_slots(order) == slots
    ring = SharedRing(bytearray(4096 << order), blkif.RING_ENTRY_SIZE)
    assert ring.size == slots and ring.slot(1) == HEADER_SIZE + 112


def test_ring_ref_keys_and_feature_names():
    assert blkif.ring_ref_keys(0) == ["ring-ref"]
    assert blkif.ring_ref_keys(2) == ["ring-ref0", "ring-ref1", "ring-ref2", "ring-ref3"]
    assert (blkif.FEATURE_FLUSH_CACHE, blkif.FEATURE_BARRIER, blkif.FEATURE_DISCARD, blkif.FEATURE_PERSISTENT) == (
        "feature-flush-cache", "feature-barrier", "feature-discard", "feature-persistent")
    assert (blkif.FEATURE_MAX_INDIRECT_SEGMENTS, blkif.MAX_RING_PAGE_ORDER, blkif.RING_PAGE_ORDER) == (
        "feature-max-indirect-segments", "max-ring-page-order", "ring-page-order")
    assert (blkif.EVENT_CHANNEL, blkif.PROTOCOL, blkif.SECTORS, blkif.SECTOR_SIZE_KEY, blkif.INFO) == (
        "event-channel", "protocol", "sectors", "sector-size", "info")


@pytest.mark.parametrize("name,devid", [("xvda", 51712), ("xvdb", 51728), ("xvdp", 51952)])
def test_xvd_devid_follows_xens_vbd_numbering(name, devid):
    assert blkif.xvd_devid(name) == devid == (202 << 8) | ((ord(name[3]) - ord("a")) << 4)


@pytest.mark.parametrize("name", ["sda", "xvd", "xvdq", "xvdb1", "hda"])
def test_xvd_devid_refuses_other_names(name):
    with pytest.raises(BlkifError, match="not a whole-disk xvd name"):
        blkif.xvd_devid(name)
