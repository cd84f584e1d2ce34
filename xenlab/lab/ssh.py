"""The one SSH wrapper: paramiko with the lab's key and a pinned host key."""

from __future__ import annotations

import base64
import logging
import os
import shlex
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from xenlab.errors import SSHError

# Connecting while sshd starts fails a few times by design; paramiko would log
# each failure with a traceback.
logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)


class Output(Protocol):
    """Where stream() writes a command's output as it comes: a binary file, or
    anything with the same write and flush (the guest exec's framing)."""

    def write(self, data: bytes, /) -> object: ...

    def flush(self) -> object: ...


@dataclass(frozen=True)
class CommandResult:
    command: str
    exit_status: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


def generate_key(path: Path) -> str:
    """Write a new ed25519 key (mode 0600) and its .pub; return 'ssh-ed25519 BASE64'."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
        f.write(private)
    path.with_suffix(".pub").write_text(public + " xenlab\n")
    return public


def known_hosts_line(port: int, host_key: str) -> str:
    return f"[127.0.0.1]:{port} {host_key}\n"


class SSHSession:
    """A connection to one host; commands, files and raw channels over it."""

    def __init__(self, port: int, key_file: Path, host_key: str, host: str = "127.0.0.1", user: str = "root",
                 sock_factory=None, via: str = ""):
        self.host, self.port, self.user = host, port, user
        self.sock_factory = sock_factory  # a new socket-like channel per try (a tunnel), else a TCP connection
        # Where dom0's forwarded port is, in messages: "127.0.0.1:PORT", or "... on USER@HOST:22".
        self.where = f"{host}:{port}" + (f" on {via}" if via else "")
        self.key_file = key_file
        kind, blob = host_key.split()[:2]
        self._pinned = paramiko.PKey.from_type_string(kind, base64.b64decode(blob))
        self._client: paramiko.SSHClient | None = None

    def connect(self, timeout: float = 30.0, cancel: threading.Event | None = None) -> SSHSession:
        """Connect, retrying until `timeout` (or `cancel` is set) while sshd is still starting."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline and not (cancel and cancel.is_set()):
            client = paramiko.SSHClient()
            hostname = f"[{self.host}]:{self.port}" if self.port != 22 else self.host
            client.get_host_keys().add(hostname, self._pinned.get_name(), self._pinned)
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            try:
                client.connect(
                    self.host, self.port, self.user, key_filename=str(self.key_file),
                    sock=self.sock_factory() if self.sock_factory else None,
                    timeout=5, banner_timeout=15, auth_timeout=15, allow_agent=False, look_for_keys=False,
                )
                self._client = client
                return self
            except paramiko.BadHostKeyException as e:
                client.close()
                raise SSHError(
                    f"dom0 at {self.where} presented a host key that does not match the one pinned at build time",
                    "something else answers on this port, or the image changed: `xenlab down` and `xenlab up` again",
                ) from e
            except (OSError, paramiko.SSHException, EOFError) as e:
                client.close()
                last = e
                time.sleep(0.3)
        raise SSHError(f"no SSH on {self.where} after {timeout:.0f} s: {last}", "see the serial log (`xenlab console`)")

    @property
    def client(self) -> paramiko.SSHClient:
        if self._client is None:
            raise SSHError("SSH session is not connected")
        return self._client

    def transport(self) -> paramiko.Transport:
        return self.client.get_transport()

    def run(self, command: str | list[str], timeout: float = 120.0, input: bytes | None = None) -> CommandResult:
        cmd = command if isinstance(command, str) else shlex.join(command)
        try:
            chan = self.transport().open_session(timeout=10)
            chan.settimeout(timeout)
            chan.exec_command(cmd)
            if input is not None:
                chan.sendall(input)
            chan.shutdown_write()
            out, err = bytearray(), bytearray()
            # Read both streams until EOF; a full stderr buffer would otherwise stall stdout.
            while not (chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready()):
                if chan.recv_ready():
                    out += chan.recv(65536)
                elif chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                else:
                    chan.status_event.wait(0.01)
            out += _drain(chan.recv)
            err += _drain(chan.recv_stderr)
            status = chan.recv_exit_status()
            chan.close()
        except TimeoutError:
            raise SSHError(f"command did not finish within {timeout:.0f} s: {cmd}") from None
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise SSHError(f"SSH to {self.where} failed running {cmd!r}: {e}", "is the lab still up? `xenlab status`") from None
        return CommandResult(cmd, status, out.decode(errors="replace"), err.decode(errors="replace"))

    def check(self, command: str | list[str], timeout: float = 120.0, input: bytes | None = None) -> str:
        result = self.run(command, timeout=timeout, input=input)
        if not result.ok:
            raise SSHError(f"`{result.command}` failed in dom0 with exit code {result.exit_status}: {result.stderr.strip()[-800:]}")
        return result.stdout

    def stream(self, command: str, stdin: BinaryIO | None, stdout: Output, stderr: Output) -> int:
        """Run `command` with its output written to stdout/stderr as it comes
        and `stdin` (when given) forwarded until its end, as OpenSSH does; the exit status."""
        try:
            chan = self.transport().open_session(timeout=10)
            chan.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise SSHError(f"SSH to {self.where} failed running {command!r}: {e}", "is the lab still up? `xenlab status`") from None
        if stdin is not None:
            threading.Thread(target=_forward, args=(stdin, chan), name="ssh-stdin", daemon=True).start()
        else:
            chan.shutdown_write()
        while True:
            got = False
            while chan.recv_ready():
                stdout.write(chan.recv(65536))
                got = True
            while chan.recv_stderr_ready():
                stderr.write(chan.recv_stderr(65536))
                got = True
            if got:
                stdout.flush()
                stderr.flush()
            elif chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                break
            else:
                chan.status_event.wait(0.05)
        stdout.write(_drain(chan.recv))
        stderr.write(_drain(chan.recv_stderr))
        stdout.flush()
        stderr.flush()
        status = chan.recv_exit_status()
        chan.close()
        return status

    def open_local(self, port: int, timeout: float = 10.0) -> paramiko.Channel | None:
        """A channel to 127.0.0.1:PORT on the far side (direct-tcpip, as `ssh -L`
        opens), or None when nothing listens there."""
        try:
            return self.transport().open_channel("direct-tcpip", ("127.0.0.1", port), ("127.0.0.1", 0), timeout=timeout)
        except paramiko.ChannelException:
            return None
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise SSHError(f"SSH to {self.where} failed opening a channel to its port {port}: {e}",
                           "is the lab still up? `xenlab status`") from None

    def put(self, data: bytes, remote: str, mode: int = 0o644) -> None:
        sftp = self.client.open_sftp()
        try:
            with sftp.open(remote, "wb") as f:
                f.write(data)
            sftp.chmod(remote, mode)
        finally:
            sftp.close()

    def get(self, remote: str) -> bytes:
        sftp = self.client.open_sftp()
        try:
            with sftp.open(remote, "rb") as f:
                return f.read()
        finally:
            sftp.close()

    @property
    def active(self) -> bool:
        """Connected, and the connection has not dropped."""
        transport = self._client.get_transport() if self._client is not None else None
        return transport is not None and transport.is_active()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> SSHSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _forward(source: BinaryIO, chan) -> None:
    """Our stdin to the remote command's, then EOF (as OpenSSH does when stdin ends)."""
    try:
        while chunk := source.read1(65536) if hasattr(source, "read1") else source.read(65536):
            chan.sendall(chunk)
    except (OSError, EOFError, paramiko.SSHException):
        pass  # the command ended first: its exit status tells the story
    finally:
        try:
            chan.shutdown_write()
        except (OSError, EOFError):
            pass


def _drain(recv) -> bytes:
    data = bytearray()
    while chunk := recv(65536):
        data += chunk
    return bytes(data)
