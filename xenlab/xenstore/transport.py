"""pyxs's packet connection carried over the lab's SSH connection.

dom0's xenstored listens on a Unix socket; an exec channel running socat
joins that socket to the channel's stdin/stdout, so pyxs speaks the real
wire protocol to the real daemon. paramiko channels offer fileno() for
select(), which is all pyxs's router needs."""

from __future__ import annotations

import errno
import shlex

import paramiko
from pyxs._internal import Packet
from pyxs.connection import PacketConnection
from pyxs.exceptions import ConnectionError as PyXSConnectionError

# The C xenstored's socket (XEN_RUN_STORED); the others cover builds that
# moved it. The shell picks the first that exists, so connecting is one round trip.
SOCKET_CANDIDATES = ("/run/xenstored/socket", "/var/run/xenstored/socket", "/run/xen/xenstored/socket")
NO_SOCKET_EXIT = 97
NO_SOCAT_EXIT = 98


def bridge_command(socket_path: str | None = None) -> str:
    candidates = (socket_path,) if socket_path else SOCKET_CANDIDATES
    return (
        f"command -v socat >/dev/null || {{ echo 'socat is not installed in dom0' >&2; exit {NO_SOCAT_EXIT}; }}; "
        f"for s in {' '.join(shlex.quote(c) for c in candidates)}; do "
        '[ -S "$s" ] && exec socat -b 65536 - UNIX-CONNECT:"$s"; done; '
        f"echo 'no xenstored socket at {' or '.join(candidates)} (is xenstored running?)' >&2; exit {NO_SOCKET_EXIT}"
    )


class ChannelTransport:
    """The byte stream pyxs reads packets from: one paramiko exec channel."""

    def __init__(self, chan: paramiko.Channel, read_timeout: float):
        self.chan = chan
        # Only a packet's remainder is read with this bound: the router
        # select()s before each header, so an idle connection never times out.
        chan.settimeout(read_timeout)

    def fileno(self) -> int:
        return self.chan.fileno()

    def recv(self, size: int) -> bytes:
        chunks, want = [], size
        while want:
            data = self.chan.recv(want)
            if not data:
                raise OSError(errno.ECONNRESET, self.why_closed())
            chunks.append(data)
            want -= len(data)
        return b"".join(chunks)

    def send(self, data: bytes) -> None:
        if self.chan.closed or self.chan.exit_status_ready():
            raise OSError(errno.EPIPE, self.why_closed())
        self.chan.sendall(data)

    def why_closed(self) -> str:
        """The bridge's own account of its end (stderr, exit status), or the SSH link's."""
        stderr = b""
        try:
            while self.chan.recv_stderr_ready():
                stderr += self.chan.recv_stderr(4096)
        except (OSError, paramiko.SSHException):
            pass
        transport = self.chan.get_transport()
        if transport is None or not transport.is_active():
            return "the SSH connection to dom0 is gone (lab stopped or restarted?)"
        if self.chan.exit_status_ready():
            status = self.chan.recv_exit_status()
            text = stderr.decode(errors="replace").strip()
            return f"the socat bridge to xenstored exited with status {status}" + (f": {text}" if text else "")
        return "the channel to xenstored was closed"

    def close(self) -> None:
        self.chan.close()


class SSHConnection(PacketConnection):
    """A pyxs connection whose transport is an SSH exec channel into dom0."""

    def __init__(self, ssh_transport: paramiko.Transport, socket_path: str | None = None, read_timeout: float = 30.0):
        self.ssh_transport = ssh_transport
        self.socket_path = socket_path
        self.read_timeout = read_timeout
        self.path = f"dom0:{socket_path or SOCKET_CANDIDATES[0]} (over SSH)"

    def create_transport(self) -> ChannelTransport:
        try:
            chan = self.ssh_transport.open_session(timeout=10)
            chan.exec_command(bridge_command(self.socket_path))
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise PyXSConnectionError(f"cannot open an SSH channel to dom0: {e}") from None
        return ChannelTransport(chan, self.read_timeout)

    def send(self, packet) -> None:
        # pyxs writes header and payload separately: two SSH packets, the
        # second held back by Nagle until the first is ACKed (tens of ms
        # with delayed ACKs). One write per request avoids that.
        if not self.is_connected:
            raise PyXSConnectionError("not connected")
        header = Packet._struct.pack(packet.op, packet.rq_id, packet.tx_id, packet.size)
        try:
            self.transport.send(header + packet.payload)
        except OSError as e:
            self.close()
            raise PyXSConnectionError(e.strerror or str(e)) from e
