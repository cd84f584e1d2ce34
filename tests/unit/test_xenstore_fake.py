"""A tiny in-process xenstored speaking the wire protocol over a socketpair,
for unit tests of the client's own logic (deadlines, dead connections,
transaction retries). The real daemon is exercised by tests/e2e."""

from __future__ import annotations

import socket
import struct
import threading

from pyxs._internal import Op
from pyxs.connection import PacketConnection

from xenlab.xenstore.client import XenStore, _Client, _Router

HEADER = struct.Struct("IIII")


class _SocketTransport:
    def __init__(self, sock):
        self.sock = sock

    def fileno(self):
        return self.sock.fileno()

    def recv(self, size):
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise OSError(104, "fake xenstored closed the connection")
            data += chunk
        return data

    def send(self, data):
        self.sock.sendall(data)

    def close(self):
        self.sock.close()


class _Conn(PacketConnection):
    def __init__(self, sock):
        self.sock, self.path = sock, "fake"

    def create_transport(self):
        return _SocketTransport(self.sock)


class FakeXenstored:
    def __init__(self):
        self.nodes: dict[str, bytes] = {"/": b""}
        self.silent = False  # swallow requests: the client must time out
        self.eagain_commits = 0  # commits to refuse with EAGAIN
        self.requests: list[tuple[int, bytes]] = []
        self.client_sock, self.server_sock = socket.socketpair()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def store(self, timeout: float = 2.0) -> XenStore:
        client = _Client(_Router(_Conn(self.client_sock)), timeout)
        client.connect()
        return XenStore(client)

    def kill(self):
        try:
            self.server_sock.shutdown(socket.SHUT_RDWR)
            self.server_sock.close()
        except OSError:
            pass  # killed already

    def _serve(self):
        buf = b""
        try:
            while True:
                chunk = self.server_sock.recv(65536)
                if not chunk:
                    return
                buf += chunk
                while len(buf) >= HEADER.size:
                    op, rq, tx, size = HEADER.unpack(buf[: HEADER.size])
                    if len(buf) < HEADER.size + size:
                        break
                    payload, buf = buf[HEADER.size : HEADER.size + size], buf[HEADER.size + size :]
                    self.requests.append((op, payload))
                    if not self.silent:
                        rop, reply = self._answer(op, payload, tx)
                        self.server_sock.sendall(HEADER.pack(rop, rq, tx, len(reply)) + reply)
        except OSError:
            return

    def _answer(self, op, payload, tx):
        args = payload.split(b"\0")
        path = args[0].decode(errors="replace")
        if op == Op.READ:
            return (op, self.nodes[path]) if path in self.nodes else (Op.ERROR, b"ENOENT\0")
        if op == Op.WRITE:
            self.nodes[path] = payload[len(args[0]) + 1 :]
            return op, b"OK\0"
        if op == Op.DIRECTORY:
            if path not in self.nodes:
                return Op.ERROR, b"ENOENT\0"
            prefix = path.rstrip("/") + "/"
            kids = [p[len(prefix):] for p in self.nodes if p.startswith(prefix) and "/" not in p[len(prefix):] and p != "/"]
            return op, b"".join(k.encode() + b"\0" for k in kids)
        if op == Op.TRANSACTION_START:
            return op, b"7\0"
        if op == Op.TRANSACTION_END:
            if args[0] == b"T" and self.eagain_commits:
                self.eagain_commits -= 1
                return Op.ERROR, b"EAGAIN\0"
            return op, b"OK\0"
        if op == Op.GET_DOMAIN_PATH:
            return op, b"/local/domain/" + args[0] + b"\0"
        return Op.ERROR, b"ENOSYS\0"
