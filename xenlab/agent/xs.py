"""A minimal XenStore client speaking the wire protocol (public/io/xs_wire.h)
over xenstored's unix socket (dom0) or /dev/xen/xenbus (any domain).

Message: u32 type, req_id, tx_id, len, then `len` payload bytes. Replies come
in order; watch events (type WATCH_EVENT) can arrive in between and are
queued for wait_watch()."""

from __future__ import annotations

import collections
import errno as _errno
import os
import select
import socket
import struct
import time
from contextlib import contextmanager

from .errors import AgentError

HEADER = struct.Struct("=IIII")
(XS_CONTROL, XS_DIRECTORY, XS_READ, XS_GET_PERMS, XS_WATCH, XS_UNWATCH, XS_TRANSACTION_START,
 XS_TRANSACTION_END, XS_INTRODUCE, XS_RELEASE, XS_GET_DOMAIN_PATH, XS_WRITE, XS_MKDIR, XS_RM,
 XS_SET_PERMS, XS_WATCH_EVENT, XS_ERROR) = range(17)
SOCKETS = ("/run/xenstored/socket", "/var/run/xenstored/socket")
DEVICES = ("/dev/xen/xenbus", "/proc/xen/xenbus")
MAX_PAYLOAD = 4096



class XsError(AgentError):
    pass


class XenStore:
    def __init__(self, timeout: float = 30.0):
        self.timeout = timeout
        self._sock = None
        self._fd = -1
        for path in SOCKETS:
            if os.path.exists(path):
                try:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.connect(path)
                    self._sock, self._fd = s, s.fileno()
                    break
                except OSError:
                    s.close()
        if self._fd < 0:
            for path in DEVICES:
                try:
                    self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                    break
                except OSError:
                    continue
        if self._fd < 0:
            raise XsError("no XenStore: neither xenstored's socket nor /dev/xen/xenbus could be opened", "is this a Xen domain with xenbus?")
        self._buf = b""
        self._req = 0
        self.events: collections.deque[tuple[str, ...]] = collections.deque()

    # -- transport -----------------------------------------------------------
    def _send(self, data: bytes) -> None:
        while data:
            n = os.write(self._fd, data)
            data = data[n:]

    def _recv_message(self, timeout: float | None) -> tuple[int, int, int, bytes] | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if len(self._buf) >= HEADER.size:
                mtype, req, tx, length = HEADER.unpack_from(self._buf)
                if len(self._buf) >= HEADER.size + length:
                    payload = self._buf[HEADER.size: HEADER.size + length]
                    self._buf = self._buf[HEADER.size + length:]
                    return mtype, req, tx, payload
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            ready, _, _ = select.select([self._fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(self._fd, 65536)
            if not chunk:
                raise XsError("XenStore connection closed")
            self._buf += chunk

    def request(self, mtype: int, payload: bytes, tx: int = 0) -> bytes:
        if len(payload) > MAX_PAYLOAD:
            raise XsError(f"XenStore request of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
        self._req = (self._req + 1) & 0xFFFFFFFF
        self._send(HEADER.pack(mtype, self._req, tx, len(payload)) + payload)
        while True:
            msg = self._recv_message(self.timeout)
            if msg is None:
                raise XsError(f"XenStore did not answer within {self.timeout:.0f} s", "is xenstored running?")
            rtype, _, _, body = msg
            if rtype == XS_WATCH_EVENT:
                self.events.append(tuple(p.decode() for p in body.split(b"\0")[:2]))
                continue
            if rtype == XS_ERROR:
                name = body.rstrip(b"\0").decode()
                path = payload.split(b"\0")[0].decode(errors="replace")
                raise XsError(f"XenStore {_NAMES.get(mtype, mtype)} {path!r}: {name}",
                              errno_=getattr(_errno, name, None))
            return body

    # -- operations ----------------------------------------------------------
    def read(self, path: str, tx: int = 0) -> str:
        return self.request(XS_READ, path.encode() + b"\0", tx).decode()

    def try_read(self, path: str, default: str | None = None, tx: int = 0) -> str | None:
        try:
            return self.read(path, tx)
        except XsError as e:
            # EACCES: a node removed under a parent we may not read looks like this.
            if e.errno in (_errno.ENOENT, _errno.EACCES):
                return default
            raise

    def write(self, path: str, value: str | int, tx: int = 0) -> None:
        self.request(XS_WRITE, path.encode() + b"\0" + str(value).encode(), tx)

    def mkdir(self, path: str, tx: int = 0) -> None:
        self.request(XS_MKDIR, path.encode() + b"\0", tx)

    def rm(self, path: str, tx: int = 0) -> None:
        try:
            self.request(XS_RM, path.encode() + b"\0", tx)
        except XsError as e:
            if e.errno != _errno.ENOENT:
                raise

    def rm_with_parents(self, path: str, parents: int) -> None:
        """rm(path), then up to `parents` of its ancestors that it left empty
        (a toolstack removing a device: DOMID/DEVID, then DOMID, then the type)."""
        self.rm(path)
        for _ in range(parents):
            path = path.rsplit("/", 1)[0]
            try:
                if self.directory(path):
                    return
                self.rm(path)
            except XsError:
                return

    def directory(self, path: str, tx: int = 0) -> list[str]:
        body = self.request(XS_DIRECTORY, path.encode() + b"\0", tx)
        return [p.decode() for p in body.split(b"\0") if p]

    def try_directory(self, path: str, tx: int = 0) -> list[str]:
        """directory(), or [] where there is no such node (as try_read)."""
        try:
            return self.directory(path, tx)
        except XsError as e:
            if e.errno in (_errno.ENOENT, _errno.EACCES):
                return []
            raise

    def set_perms(self, path: str, perms: list[str], tx: int = 0) -> None:
        """perms like ['n0', 'r5']: the first names the owner and everyone's default."""
        self.request(XS_SET_PERMS, path.encode() + b"\0" + b"".join(p.encode() + b"\0" for p in perms), tx)

    def get_domain_path(self, domid: int) -> str:
        return self.request(XS_GET_DOMAIN_PATH, str(domid).encode() + b"\0").decode().rstrip("\0")

    def watch(self, path: str, token: str) -> None:
        self.request(XS_WATCH, path.encode() + b"\0" + token.encode() + b"\0")

    def unwatch(self, path: str, token: str) -> None:
        try:
            self.request(XS_UNWATCH, path.encode() + b"\0" + token.encode() + b"\0")
        except XsError:
            pass

    def wait_watch(self, timeout: float | None) -> tuple[str, ...] | None:
        if self.events:
            return self.events.popleft()
        msg = self._recv_message(timeout)
        while msg is not None and msg[0] != XS_WATCH_EVENT:
            msg = self._recv_message(timeout)  # a stray reply cannot happen; be robust anyway
        if msg is None:
            return None
        return tuple(p.decode() for p in msg[3].split(b"\0")[:2])

    @contextmanager
    def transaction(self, retries: int = 10):
        """Yield a transaction id; commit at the end, retrying the body on EAGAIN is the caller's loop."""
        tx = int(self.request(XS_TRANSACTION_START, b"\0").rstrip(b"\0"))
        ok = False
        try:
            yield tx
            ok = True
        finally:
            try:
                self.request(XS_TRANSACTION_END, (b"T" if ok else b"F") + b"\0", tx)
            except XsError:
                if ok:
                    raise

    def wait_for(self, path: str, accept, timeout: float, what: str = "", gone_ok: bool = False) -> str | None:
        """Watch `path` until accept(value) is true; returns the value (None
        when `gone_ok` and the node is removed, e.g. a backend that closed and
        cleaned up before we looked)."""
        token = f"wait-{os.getpid()}-{time.monotonic_ns()}"
        self.watch(path, token)
        deadline = time.monotonic() + timeout
        try:
            while True:
                value = self.try_read(path)
                if value is not None and accept(value):
                    return value
                if value is None and gone_ok:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise XsError(f"timed out after {timeout:.0f} s waiting for {what or path} (last value {value!r})")
                self.wait_watch(left)
        finally:
            self.unwatch(path, token)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        elif self._fd >= 0:
            os.close(self._fd)
        self._fd = -1
        self._sock = None

    def __enter__(self) -> XenStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_NAMES = {XS_READ: "read", XS_WRITE: "write", XS_MKDIR: "mkdir", XS_RM: "rm", XS_DIRECTORY: "directory",
          XS_SET_PERMS: "set_perms", XS_WATCH: "watch", XS_UNWATCH: "unwatch", XS_GET_DOMAIN_PATH: "get_domain_path",
          XS_TRANSACTION_START: "transaction_start", XS_TRANSACTION_END: "transaction_end"}
