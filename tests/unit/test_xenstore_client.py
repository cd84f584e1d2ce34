"""The client's own logic against a small fake daemon: str values, bounded
waits, dead connections, transaction retries, input checks."""

import time

import pytest

from xenlab.errors import XenStoreError
from xenlab.xenstore.client import XenStoreConnectionError, XenStoreRequestError, XenStoreTimeout

from .test_xenstore_fake import FakeXenstored


@pytest.fixture
def fake():
    server = FakeXenstored()
    yield server
    server.kill()


def test_str_round_trip_with_empty_and_non_ascii_values(fake):
    xs = fake.store()
    xs.write("/a", "héllo\tworld")
    xs.write("/b", "")  # pyxs itself refuses an empty value
    assert xs.read("/a") == "héllo\tworld" and xs.read("/b") == ""
    assert fake.nodes["/a"] == "héllo\tworld".encode()
    xs.close()


def test_missing_node_names_path_and_errno(fake):
    xs = fake.store()
    with pytest.raises(XenStoreRequestError) as e:
        xs.read("/nope")
    assert e.value.errno == 2 and "/nope" in str(e.value) and "ENOENT" in str(e.value)
    assert xs.read("/nope", None) is None
    xs.close()


def test_no_answer_times_out_naming_the_path(fake):
    xs = fake.store(timeout=0.5)
    fake.silent = True
    start = time.monotonic()
    with pytest.raises(XenStoreTimeout) as e:
        xs.read("/local/domain/0/name")
    assert time.monotonic() - start < 2
    assert "/local/domain/0/name" in str(e.value) and "0.5 s" in str(e.value)
    xs.close()


def test_dead_connection_fails_fast_naming_the_path(fake):
    xs = fake.store(timeout=30)
    fake.silent = True
    start = time.monotonic()
    import threading

    threading.Timer(0.3, fake.kill).start()
    with pytest.raises(XenStoreConnectionError) as e:
        xs.read("/some/path")
    assert time.monotonic() - start < 5  # not the 30 s deadline: the router wakes waiters
    assert "/some/path" in str(e.value) and "closed the connection" in str(e.value)
    with pytest.raises(XenStoreConnectionError):
        xs.write("/other", "1")  # later requests fail at once too
    xs.close()


def test_transaction_retried_on_eagain(fake):
    xs = fake.store()
    fake.eagain_commits = 2
    calls = []

    def body(tx):
        calls.append(tx.id)
        tx.write("/counter", str(len(calls)))
        return len(calls)

    assert xs.transaction(body) == 3
    assert xs.tx_attempts == 3 and fake.nodes["/counter"] == b"3"
    xs.close()


def test_transaction_gives_up_after_retries(fake):
    xs = fake.store()
    fake.eagain_commits = 100
    with pytest.raises(XenStoreError, match="still conflicting after 3 attempts"):
        xs.transaction(lambda tx: tx.write("/x", "1"), retries=3)
    xs.close()


@pytest.mark.parametrize("path", ["", "no spaces", "/a//b", "/a/", "/a/b\n", "@foo", "/" + "x" * 3100])
def test_bad_paths_refused_before_sending(fake, path):
    xs = fake.store()
    sent = len(fake.requests)
    with pytest.raises(XenStoreError, match="invalid XenStore path"):
        xs.read(path)
    assert len(fake.requests) == sent
    xs.close()


def test_over_long_value_refused_naming_path(fake):
    xs = fake.store()
    with pytest.raises(XenStoreError, match=r"value for /v is 5000 bytes; XenStore takes at most 4093"):
        xs.write("/v", "x" * 5000)
    xs.close()


def test_batch_pipelines_and_reports_per_request(fake):
    xs = fake.store()
    fake.nodes.update({"/d": b"", "/d/a": b"1", "/d/b": b"2"})
    results = xs.batch([("ls", "/d"), ("read", "/d/a"), ("read", "/missing"), ("read", "/d/b")])
    assert results[0] == ["a", "b"] and results[1] == "1" and results[3] == "2"
    assert isinstance(results[2], XenStoreRequestError)
    xs.close()
