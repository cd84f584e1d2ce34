"""io/ring.h index arithmetic and rules, on a plain buffer (no Xen needed)."""

import struct

import pytest

from xenlab.agent.ring import HEADER_SIZE, MASK32, BackRing, FrontRing, RingError, SharedRing, dist, ring_size


def make(start=0, entry=16, nbytes=4096):
    buf = bytearray(nbytes)
    s = SharedRing(buf, entry)
    s.init(start)
    return buf, s, FrontRing(s), BackRing(SharedRing(buf, entry))


def test_ring_size_rounds_down_to_power_of_two():
    assert ring_size(4096, 16) == 128  # 252 entries fit
    assert ring_size(4096, 64) == 32   # 63 fit
    assert ring_size(4096, 112) == 32  # blkif-sized entries: 36 fit
    assert ring_size(4096, 4032) == 1
    with pytest.raises(ValueError):
        ring_size(4096, 4033)


def test_header_layout_is_64_bytes_with_indices_first():
    buf, s, front, _ = make(start=7)
    assert HEADER_SIZE == 64
    assert struct.unpack_from("=4I", buf, 0) == (7, 8, 7, 8)  # req_prod, req_event, rsp_prod, rsp_event
    assert s.slot(0) == 64 and s.slot(127) == 64 + 127 * 16 and s.slot(128) == 64


def test_dist_is_modulo_2_32():
    assert dist(3, MASK32) == 4
    assert dist(0, 0) == 0
    assert dist(5, 10) == MASK32 - 4


def test_each_side_writes_only_its_own_indices():
    buf, s, front, back = make()
    before = bytes(buf[:16])
    front.put_request(b"a" * 16)
    front.push_requests()
    # frontend moved only req_prod
    assert struct.unpack_from("=4I", buf) == (1, 1, 0, 1)
    assert back.unconsumed_requests() == 1
    back.get_request()
    back.put_response(b"b" * 16)
    back.push_responses()
    assert struct.unpack_from("=4I", buf) == (1, 1, 1, 1)
    assert before != bytes(buf[:16])
    # final checks write only the caller's event index
    assert front.unconsumed_responses() == 1
    front.get_response()
    assert front.final_check_for_responses() is False
    assert struct.unpack_from("=4I", buf) == (1, 1, 1, 2)  # rsp_event = rsp_cons + 1
    assert back.final_check_for_requests() is False
    assert struct.unpack_from("=4I", buf) == (1, 2, 1, 2)  # req_event = req_cons + 1


def test_notify_only_when_the_peer_asked():
    buf, s, front, back = make()
    front.put_request(b"x")
    assert front.push_requests() is True          # req_event = 1 lies in (0, 1]
    front.put_request(b"y")
    assert front.push_requests() is False         # backend has not asked again
    assert back.unconsumed_requests() == 2
    back.get_request(), back.get_request()
    assert back.final_check_for_requests() is False   # sets req_event = 3
    front.put_request(b"z")
    assert front.push_requests() is True
    # a batch crossing the threshold notifies once
    back.get_request()
    back.final_check_for_requests()               # req_event = 4
    for _ in range(5):
        front.put_request(b"w")
    assert front.push_requests() is True


def test_response_notify_threshold():
    buf, s, front, back = make()
    for _ in range(3):
        front.put_request(b"r")
    front.push_requests()
    for _ in range(3):
        back.get_request()
    back.put_response(b"1")
    assert back.push_responses() is True          # rsp_event = 1
    back.put_response(b"2")
    assert back.push_responses() is False
    front.get_response(), front.get_response()
    assert front.final_check_for_responses() is False  # rsp_event = 3
    back.put_response(b"3")
    assert back.push_responses() is True


def test_ring_full_and_refusal():
    buf, s, front, back = make()
    for i in range(front.size):
        front.put_request(struct.pack("=I", i))
    assert front.full() and front.free_requests() == 0
    with pytest.raises(RingError, match="ring full"):
        front.put_request(b"one too many")
    front.push_requests()
    assert back.unconsumed_requests() == 128 and back.max_unconsumed == 128
    # backend cannot consume more than a ring's worth ahead of its responses
    for _ in range(128):
        back.get_request()
    assert back.unconsumed_requests() == 0
    back.put_response(b"r")
    back.push_responses()
    front.get_response()
    assert front.free_requests() == 1


@pytest.mark.parametrize("start", [0, 0xFFFFFF80, MASK32 - 3, 0x7FFFFFFF])
def test_indices_wrap_through_2_32(start):
    buf, s, front, back = make(start=start, entry=8, nbytes=64 + 8 * 8)
    assert front.size == 8
    sent = got = 0
    for _ in range(50):
        while not front.full():
            front.put_request(struct.pack("=Q", sent))
            sent += 1
        front.push_requests()
        while back.unconsumed_requests():
            (n,) = struct.unpack("=Q", back.get_request())
            back.put_response(struct.pack("=Q", n + 1000))
        back.push_responses()
        while front.unconsumed_responses():
            (v,) = struct.unpack("=Q", front.get_response())
            assert v == got + 1000
            got += 1
    assert got == sent == 400
    assert s.idx[0] == (start + 400) & MASK32 == s.idx[2]


def test_backend_rejects_garbage_producer_index():
    buf, s, front, back = make()
    front.put_request(b"ok")
    front.push_requests()
    s.idx[0] = 129  # more than RING_SIZE ahead of rsp_prod_pvt = 0
    with pytest.raises(RingError, match="garbage index"):
        back.unconsumed_requests()
    s.idx[0] = (0 - 5) & MASK32  # "behind" the consumer is the same as far ahead
    with pytest.raises(RingError):
        back.unconsumed_requests()
    s.idx[0] = 128  # exactly a full ring is legal
    assert back.unconsumed_requests() == 128


def test_frontend_rejects_garbage_response_index():
    buf, s, front, back = make()
    front.put_request(b"q")
    front.push_requests()
    s.idx[2] = 5  # five responses for one request
    with pytest.raises(RingError, match="garbage index"):
        front.unconsumed_responses()


def test_backend_cannot_respond_to_unconsumed_request():
    buf, s, front, back = make()
    with pytest.raises(RingError):
        back.put_response(b"nothing asked")


def test_entries_are_copied_out_of_the_ring():
    buf, s, front, back = make()
    front.put_request(b"A" * 16)
    front.push_requests()
    got = back.get_request()
    buf[64:80] = b"B" * 16  # the peer scribbles after we read
    assert got == b"A" * 16
    with pytest.raises(RingError):
        s.write(0, b"x" * 17)
