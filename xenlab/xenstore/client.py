"""The XenStore client: pyxs speaking to dom0's xenstored over the lab's SSH
connection, wrapped where pyxs falls short:

- str in and out (pyxs takes and returns bytes, and refuses empty or
  non-ASCII values outright);
- a deadline on every request (pyxs waits on a reply forever, and a dead
  connection kills its router thread, leaving callers blocked);
- errors that name the operation and the path, with xenstored's errno;
- transactions retried on EAGAIN;
- watches as a stream of timestamped events, with a timeout.

pyxs's Router (one reader thread, replies matched by request id) and its
Client (packets, operations, transactions, monitors) do the protocol."""

from __future__ import annotations

import errno as errno_mod
import itertools
import os
import queue
import random
import select
import time
from collections.abc import Callable, Iterator
from copy import copy
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from pyxs._internal import NUL, Op, Packet, next_rq_id
from pyxs.client import Client as PyXSClient
from pyxs.client import Router as PyXSRouter
from pyxs.exceptions import ConnectionError as PyXSConnectionError
from pyxs.exceptions import PyXSError
from pyxs.helpers import error as pyxs_error

from xenlab.errors import XenStoreConnectionError, XenStoreError, XenStoreRequestError, XenStoreTimeout
from xenlab.xenstore.paths import Perm, check_path, check_value, decode, encode
from xenlab.xenstore.transport import SSHConnection

DEFAULT_TIMEOUT = 10.0
T = TypeVar("T")

@dataclass(frozen=True)
class WatchEvent:
    path: str
    token: str
    time: float  # time.time() when the host received the event

    @property
    def watch(self) -> str:
        return self.token  # Watch puts the watched path here


_CLOSED = object()  # put on watch queues when the connection dies


class _Timeout(Exception):
    pass


class _Router(PyXSRouter):
    """pyxs's router, except that it survives its own failure: a dead
    connection is recorded and every waiter woken, instead of an exception
    ending the thread and leaving callers waiting forever. Watch events
    carry the time they arrived."""

    def __init__(self, connection) -> None:
        super().__init__(connection)
        self.thread.name = "xenstore-router"
        self.failure: str | None = None

    def __call__(self):
        try:
            while True:
                rlist, _, _ = select.select([self.connection, self.r_terminator], [], [])
                if self.r_terminator in rlist:
                    break
                packet = self.connection.recv()
                if packet.op == Op.WATCH_EVENT:
                    parts = packet.payload.split(NUL)
                    if len(parts) >= 2:
                        event = WatchEvent(decode(parts[0]), decode(parts[1]), time.time())
                        for monitor in list(self.monitors.get(parts[1], ())):
                            monitor.events.put(event)
                else:
                    # A reply nobody waits for belongs to a request that timed out.
                    rvar = self.rvars.pop(packet.rq_id, None)
                    if rvar is not None:
                        rvar.set(packet)
        except Exception as e:  # noqa: BLE001 - recorded and reported to every caller
            self.failure = _reason(e)
        finally:
            self.failure = self.failure or "the connection to xenstored was closed"
            try:
                self.connection.close()
            finally:
                self.r_terminator.close()
                self.w_terminator.close()
                self._wake_all()

    def _wake_all(self) -> None:
        for rvar in list(self.rvars.values()):
            with rvar.condition:
                rvar.condition.notify_all()
        for monitors in list(self.monitors.values()):
            for monitor in monitors:
                monitor.events.put(_CLOSED)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and self.failure is None

    def terminate(self, timeout: float = 5.0) -> None:
        if self.thread.is_alive():
            try:
                self.w_terminator.sendall(NUL)
            except OSError:
                pass
            self.thread.join(timeout)


def _reason(e: BaseException) -> str:
    """The most specific account of a connection failure: our transport's
    OSError (which pyxs wraps with its args tuple) when there is one."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__context__
    return str(e) or type(e).__name__


class _Client(PyXSClient):
    """pyxs's client with bounded waits and without its 7-bit-ASCII check
    (XenStore values are arbitrary bytes; paths are checked before)."""

    def __init__(self, router: _Router, timeout: float):
        super().__init__(router=router)
        self.timeout = timeout

    def __copy__(self):
        return type(self)(self.router, self.timeout)

    def send_command(self, op: int, *args: bytes):
        if self.router.failure:
            raise PyXSConnectionError(self.router.failure)
        try:
            return self.router.send(Packet(op, b"".join(args), rq_id=next_rq_id(), tx_id=self.tx_id))
        except PyXSConnectionError:
            raise PyXSConnectionError(self.router.failure or "the connection to xenstored is closed") from None

    def wait_reply(self, op: int, rvar, timeout: float | None = None) -> bytes:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with rvar.condition:
            while rvar.target is None:
                if self.router.failure:
                    raise PyXSConnectionError(self.router.failure)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _Timeout()
                rvar.condition.wait(min(remaining, 1.0))
        packet = rvar.target
        if packet.op == Op.ERROR:
            raise pyxs_error(packet.payload.rstrip(NUL))
        if packet.op != op:
            raise PyXSConnectionError(f"xenstored answered op {packet.op} to op {op}: protocol out of step")
        return packet.payload.rstrip(NUL) if op != Op.READ else packet.payload

    def execute_command(self, op, *args, **kwargs):
        return self.wait_reply(op, self.send_command(op, *args))


class XenStore:
    """A connection to xenstored with a str API. Thread-safe: requests from
    several threads share one connection."""

    def __init__(self, client: _Client, *, owned: Any = None, label: str = "dom0"):
        self._client = client
        self._owned = owned  # an SSH session opened for us, closed with us
        self.label = label
        self.tx_attempts = 0  # attempts the last transaction() needed

    # -- opening -----------------------------------------------------------
    @classmethod
    def over_ssh(cls, ssh, *, timeout: float = DEFAULT_TIMEOUT, socket_path: str | None = None, owned: Any = None) -> XenStore:
        """Connect through an SSHSession (xenlab.lab.ssh) to dom0's xenstored."""
        router = _Router(SSHConnection(ssh.transport(), socket_path, read_timeout=max(timeout, 5.0)))
        client = _Client(router, timeout)
        try:
            client.connect()
        except PyXSError as e:
            raise XenStoreConnectionError(f"cannot reach dom0's xenstored: {_reason(e)}", "is the lab up? `xenlab status`") from None
        xs = cls(client, owned=owned, label=f"dom0 via {ssh.where}")
        # One request proves the bridge reached a live xenstored (socat or the
        # socket may be missing; the router then reports the bridge's stderr).
        xs._do("get-domain-path", "0", lambda: client.get_domain_path(0))
        return xs

    @classmethod
    def for_lab(cls, lab, *, timeout: float = DEFAULT_TIMEOUT) -> XenStore:
        session = lab.ssh()
        try:
            return cls.over_ssh(session, timeout=timeout, owned=session)
        except BaseException:
            session.close()
            raise

    def close(self) -> None:
        self._client.router.terminate()
        if self._owned is not None:
            self._owned.close()
            self._owned = None

    def __enter__(self) -> XenStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._client.router.alive

    # -- the error boundary ------------------------------------------------
    def _do(self, op: str, path: str, fn: Callable[[], T], timeout: float | None = None) -> T:
        try:
            return fn()
        except _Timeout:
            raise XenStoreTimeout(
                f"XenStore {op} {path}: no answer from xenstored within {self._client.timeout if timeout is None else timeout:g} s",
                "dom0 may be hung or overloaded: `xenlab status`, `xenlab console`",
            ) from None
        except PyXSConnectionError as e:
            raise XenStoreConnectionError(
                f"XenStore {op} {path}: connection to xenstored lost: {_reason(e)}",
                "is the lab still up? `xenlab status`; a restarted lab needs a new connection",
            ) from None
        except PyXSError as e:
            if e.args and isinstance(e.args[0], int):
                raise XenStoreRequestError(op, path, e.args[0]) from None
            raise XenStoreError(f"XenStore {op} {path}: {e}") from None

    # -- operations ----------------------------------------------------------
    _MISSING = object()

    def read(self, path: str, default: Any = _MISSING) -> str:
        check_path(path)
        try:
            return decode(self._do("read", path, lambda: self._client.execute_command(Op.READ, encode(path) + NUL)))
        except XenStoreRequestError as e:
            if e.errno == errno_mod.ENOENT and default is not self._MISSING:
                return default
            raise

    def read_async(self, path: str) -> Callable[[], str | None]:
        """Send a read now, wait for it later: the returned callable gives the
        value (None if the node is gone). Lets a watcher issue its reads as
        events arrive instead of one round trip after another."""
        check_path(path)
        rvar = self._do("read", path, lambda: self._client.send_command(Op.READ, encode(path) + NUL))

        def result() -> str | None:
            try:
                return decode(self._do("read", path, lambda: self._client.wait_reply(Op.READ, rvar)))
            except XenStoreRequestError as e:
                if e.errno in (errno_mod.ENOENT, errno_mod.EACCES):
                    return None
                raise

        return result

    def is_introduced(self, domid: int) -> bool:
        """Whether xenstored still serves domain `domid` (False once it died)."""
        return self._do("is-domain-introduced", str(domid), lambda: self._client.is_domain_introduced(domid))

    def read_bytes(self, path: str) -> bytes:
        check_path(path)
        return self._do("read", path, lambda: self._client.execute_command(Op.READ, encode(path) + NUL))

    def write(self, path: str, value: str | bytes) -> None:
        check_path(path)
        data = check_value(path, value)
        self._do("write", path, lambda: self._client.ack(Op.WRITE, encode(path) + NUL, data))

    def mkdir(self, path: str) -> None:
        check_path(path)
        self._do("mkdir", path, lambda: self._client.ack(Op.MKDIR, encode(path) + NUL))

    def rm(self, path: str) -> None:
        check_path(path)
        self._do("rm", path, lambda: self._client.ack(Op.RM, encode(path) + NUL))

    def ls(self, path: str) -> list[str]:
        check_path(path)
        payload = self._do("ls", path, lambda: self._client.execute_command(Op.DIRECTORY, encode(path) + NUL))
        return [decode(p) for p in payload.split(NUL)] if payload else []

    def exists(self, path: str) -> bool:
        try:
            self.ls(path)
        except XenStoreRequestError as e:
            if e.errno == errno_mod.ENOENT:
                return False
            raise
        return True

    def get_perms(self, path: str) -> list[Perm]:
        check_path(path)
        payload = self._do("get-perms", path, lambda: self._client.execute_command(Op.GET_PERMS, encode(path) + NUL))
        return [Perm.parse(decode(p)) for p in payload.split(NUL) if p]

    def set_perms(self, path: str, perms: list[Perm | str]) -> None:
        check_path(path)
        parsed = [p if isinstance(p, Perm) else Perm.parse(p) for p in perms]
        args = [encode(str(p)) + NUL for p in parsed]
        self._do("set-perms", path, lambda: self._client.ack(Op.SET_PERMS, encode(path) + NUL, *args))

    def domain_path(self, domid: int) -> str:
        return decode(self._do("get-domain-path", str(domid), lambda: self._client.get_domain_path(domid)))

    # -- many requests in flight ---------------------------------------------
    WINDOW = 16  # requests in flight at once; xenstored serves them in order

    def batch(self, requests: list[tuple]) -> list[Any]:
        """Run requests pipelined: (op, path) with op read, ls or get-perms, or
        ("write", path, value). Returns per request its result (None for a
        write) or the XenStoreRequestError it raised."""
        ops = {"read": Op.READ, "ls": Op.DIRECTORY, "get-perms": Op.GET_PERMS, "write": Op.WRITE}
        results: list[Any] = [None] * len(requests)
        pending: list[tuple[int, Any]] = []

        def settle(index: int, rvar) -> None:
            op, path = requests[index][:2]
            try:
                payload = self._do(op, path, lambda: self._client.wait_reply(ops[op], rvar))
                if op == "read":
                    results[index] = decode(payload)
                elif op == "ls":
                    results[index] = [decode(p) for p in payload.split(NUL)] if payload else []
                elif op == "get-perms":
                    results[index] = [Perm.parse(decode(p)) for p in payload.split(NUL) if p]
            except XenStoreRequestError as e:
                results[index] = e

        for index, (op, path, *value) in enumerate(requests):
            if op not in ops:
                raise XenStoreError(f"batch: unknown XenStore operation {op!r}", f"use one of {', '.join(ops)}")
            check_path(path)
            args = [encode(path) + NUL] + ([check_value(path, value[0])] if op == "write" else [])
            rvar = self._do(op, path, partial(self._client.send_command, ops[op], *args))
            pending.append((index, rvar))
            if len(pending) >= self.WINDOW:
                settle(*pending.pop(0))
        for item in pending:
            settle(*item)
        return results

    # -- transactions ----------------------------------------------------------
    def transaction(self, fn: Callable[[Transaction], T], *, retries: int = 20) -> T:
        """Run fn(tx) in a XenStore transaction; on EAGAIN (a conflicting
        commit meanwhile) run it again, up to `retries` times. fn must be
        safe to repeat: it sees a fresh view each attempt."""
        for attempt in range(1, retries + 1):
            self.tx_attempts = attempt
            tx = Transaction(self)
            try:
                result = fn(tx)
            except XenStoreRequestError as e:
                tx.rollback()
                if e.errno == errno_mod.EAGAIN:
                    _backoff(attempt)
                    continue
                raise
            except BaseException:
                tx.rollback()
                raise
            if tx.commit():
                return result
            _backoff(attempt)
        raise XenStoreError(
            f"XenStore transaction still conflicting after {retries} attempts",
            "another writer keeps changing the same nodes; retry later or raise retries",
        )

    # -- watches ---------------------------------------------------------------
    _tokens = itertools.count(1)

    def watch(self, path: str, *more: str) -> Watch:
        """Watch path (and more paths) for changes to them or anything below."""
        return Watch(self, [path, *more], f"xenlab-{os.getpid()}-{next(self._tokens)}")

    def wait_for(self, path: str, predicate: Callable[[str | None], bool], timeout: float) -> str | None:
        """Wait until predicate(value of path, None if absent) holds; return that value."""
        with self.watch(path) as w:
            deadline = time.monotonic() + timeout
            while True:
                value = self.read(path, None)
                if predicate(value):
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0 or w.get(remaining) is None:
                    raise XenStoreTimeout(
                        f"XenStore {path}: condition not met within {timeout:g} s (value now: {self.read(path, None)!r})"
                    )

    # -- trees -------------------------------------------------------------------
    def walk(self, top: str = "/", perms: bool = False) -> Iterator[tuple[str, str | None, list[str], list[Perm] | None]]:
        """(path, value, children, perms) for every node under top, depth first in
        xenstored's order. One round trip per tree level: each level's
        directories, values and permissions are fetched pipelined."""
        from xenlab.xenstore.tree import walk_levels

        return walk_levels(self, top, perms)

    def ls_f(self, path: str = "/", perms: bool = False) -> list[str]:
        from xenlab.xenstore.tree import ls_lines

        return ls_lines(self, path, full=True, perms=perms)

    def dump(self, path: str = "/") -> dict:
        from xenlab.xenstore.tree import dump

        return dump(self, path)


class Transaction(XenStore):
    """The same API inside one XenStore transaction (shares the connection)."""

    def __init__(self, parent: XenStore):
        super().__init__(copy(parent._client), label=parent.label)
        self._do("transaction-start", "", self._client.transaction)
        self.id = self._client.tx_id

    def commit(self) -> bool:
        """True if committed; False if xenstored refused with EAGAIN (a conflict)."""
        try:
            return self._do("transaction-commit", f"(tx {self.id})", self._client.commit)
        except XenStoreRequestError as e:
            if e.errno == errno_mod.EAGAIN:
                return False
            raise

    def rollback(self) -> None:
        if not self._client.tx_id:
            return
        try:
            self._do("transaction-abort", f"(tx {self.id})", self._client.rollback)
        except XenStoreError:
            pass  # rolling back after another failure: the first error is the one to report

    def transaction(self, fn, *, retries: int = 20):
        raise XenStoreError("XenStore transactions do not nest")

    def close(self) -> None:
        self.rollback()


class Watch:
    """A XenStore watch on one or more paths: iterate for events, or
    get(timeout). xenstored fires one event per watched path as soon as the
    watch is registered. An event's `watch` is the watched path it matched."""

    def __init__(self, xs: XenStore, paths: list[str], token: str):
        for p in paths:
            check_path(p, watch=True)
        self.xs, self.paths = xs, list(paths)
        self._tokens = {f"{token}#{i}": p for i, p in enumerate(paths)}
        self._monitor = xs._client.monitor()
        self._closed = False
        try:
            for tok, p in self._tokens.items():
                xs._do("watch", p, partial(self._monitor.watch, encode(p), encode(tok)))
        except BaseException:
            self.close()
            raise

    @property
    def path(self) -> str:
        return self.paths[0]

    def get(self, timeout: float | None = None) -> WatchEvent | None:
        """The next event, or None after `timeout` seconds (None: wait as long as it takes)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        router = self.xs._client.router
        while True:
            wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            try:
                event = self._monitor.events.get(timeout=wait) if wait > 0 else self._monitor.events.get_nowait()
            except queue.Empty:
                if router.failure:
                    event = _CLOSED
                elif deadline is not None and time.monotonic() >= deadline:
                    return None
                else:
                    continue
            if event is _CLOSED:
                raise XenStoreConnectionError(
                    f"XenStore watch {' '.join(self.paths)}: connection to xenstored lost: {router.failure}",
                    "is the lab still up? `xenlab status`",
                )
            return WatchEvent(event.path, self._tokens.get(event.token, event.token), event.time)

    def __iter__(self) -> Iterator[WatchEvent]:
        while True:
            event = self.get(None)
            assert event is not None  # without a timeout, get waits until there is one
            yield event

    def drain(self) -> list[WatchEvent]:
        """Every event already received, without waiting."""
        events = []
        while (event := self.get(0)) is not None:
            events.append(event)
        return events

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for tok, p in self._tokens.items():
            if (encode(p), encode(tok)) not in self._monitor.unwatch_queue or not self.xs._client.router.alive:
                continue
            try:
                self.xs._do("unwatch", p, partial(self._monitor.unwatch, encode(p), encode(tok)))
            except XenStoreError:
                pass  # the connection's end removes the watch anyway

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _backoff(attempt: int) -> None:
    # Random so that two retrying writers do not collide in lockstep.
    time.sleep(random.uniform(0, min(0.2, 0.005 * 2**attempt)))
