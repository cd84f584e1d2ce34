"""Labs on another libvirt host (`qemu+ssh://` or `qemu+libssh://` URIs).

What such a lab needs there is put there, not assumed:
- the boot files and dom0's disk go into a storage pool xenlab owns on that
  host, uploaded through libvirt's storage API as volumes named by their
  cache entry (so once per image); the lab's disk is a qcow2 volume backed
  by the image's;
- dom0's SSH, which QEMU forwards on that host's loopback, is reached through
  a direct-tcpip channel of an SSH connection to the host, the same host,
  user and key libvirt's URI names: no port is opened beyond loopback;
- the serial log QEMU writes there is read over that connection."""

from __future__ import annotations

import shlex
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import paramiko

from xenlab.errors import LabError
from xenlab.lab import virt

POOL = "xenlab"
REMOTE_SCHEMES = ("qemu+ssh", "qemu+libssh", "qemu+libssh2")
# A free TCP port on the remote host's loopback, asked of the host itself.
FREE_PORT = "python3 -c 'import socket; s=socket.socket(); s.bind((\"127.0.0.1\", 0)); print(s.getsockname()[1])'"

_clients: dict[tuple, paramiko.SSHClient] = {}
_clients_lock = threading.Lock()


def _forget_client(host: RemoteHost) -> None:
    """Drop a broken connection to the host, so the next call connects anew."""
    with _clients_lock:
        client = _clients.pop(host.client_key, None)
    if client is not None:
        client.close()


@dataclass(frozen=True)
class RemoteHost:
    uri: str
    host: str
    user: str
    port: int
    keyfile: str  # "" = the user's default keys and agent, as libvirt's ssh transport
    known_hosts: str  # "" = ~/.ssh/known_hosts

    @classmethod
    def of(cls, uri: str) -> RemoteHost | None:
        """The remote host a libvirt URI names, or None for a local URI."""
        parsed = urllib.parse.urlsplit(uri)
        if parsed.scheme not in REMOTE_SCHEMES or not parsed.hostname:
            return None
        query = dict(urllib.parse.parse_qsl(parsed.query))
        return cls(uri, parsed.hostname, parsed.username or "root", parsed.port or 22,
                   query.get("keyfile", ""), query.get("known_hosts", ""))

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    # -- SSH to the host -----------------------------------------------------
    @property
    def client_key(self) -> tuple:
        return self.host, self.port, self.user, self.keyfile, self.known_hosts

    def client(self) -> paramiko.SSHClient:
        """One connection per host for the life of the process, host key checked."""
        key = self.client_key
        with _clients_lock:
            client = _clients.get(key)
            if client is not None and client.get_transport() is not None and client.get_transport().is_active():
                return client
            client = paramiko.SSHClient()
            known = Path(self.known_hosts or "~/.ssh/known_hosts").expanduser()
            if known.exists():
                client.load_host_keys(str(known))
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            try:
                client.connect(self.host, self.port, self.user, key_filename=self.keyfile or None, timeout=10,
                               banner_timeout=15, auth_timeout=15, allow_agent=not self.keyfile, look_for_keys=not self.keyfile)
            except paramiko.SSHException as e:
                raise LabError(f"cannot SSH to the libvirt host {self.where}: {e}",
                               f"the lab reaches dom0 through SSH to that host with the URI's user and key; check `ssh -p {self.port} {self.user}@{self.host}`"
                               + ("" if known.exists() else f" (no known_hosts file {known})")) from None
            except OSError as e:
                raise LabError(f"cannot reach the libvirt host {self.where}: {e}", "check the host name and port of the URI") from None
            _clients[key] = client
            return client

    def run(self, command: str, timeout: float = 60) -> bytes:
        try:
            _, out, err = self.client().exec_command(command, timeout=timeout)
            data = out.read()
        except (paramiko.SSHException, OSError) as e:  # the host went away, or the connection timed out
            _forget_client(self)
            raise LabError(f"lost the SSH connection to the libvirt host {self.where}: {e or type(e).__name__}",
                           "check that the host is up and reachable") from None
        if out.channel.recv_exit_status() != 0:
            raise LabError(f"on {self.where}: `{command}` failed: {err.read().decode(errors='replace').strip()}")
        return data

    def free_port(self) -> int:
        return int(self.run(FREE_PORT).strip())

    def tunnel(self, port: int) -> paramiko.Channel:
        """A channel to the host's 127.0.0.1:port (dom0's forwarded SSH)."""
        transport = self.client().get_transport()
        try:
            return transport.open_channel("direct-tcpip", ("127.0.0.1", port), ("127.0.0.1", 0), timeout=15)
        except (paramiko.SSHException, OSError):
            if not transport.is_active():  # the host went away: connect anew next time
                _forget_client(self)
            raise

    def read_from(self, path: str, offset: int) -> bytes:
        """The bytes of a file on the host from `offset` on ('' when it has no more)."""
        return self.run(f"tail -c +{offset + 1} {shlex.quote(path)} 2>/dev/null || true")

    def check_qemu(self, conn) -> None:
        """Refuse, before anything is sent, a host whose libvirt has no QEMU for x86_64 guests."""
        if not virt.has_x86_64_emulator(conn):
            raise LabError(f"the libvirt host {self.where} has no QEMU for x86_64 guests (its libvirt lists none)",
                           "install qemu-system-x86 there (and qemu-utils, for the lab's disk overlay), "
                           "and make sure its libvirt daemon finds them on its PATH")

    # -- the storage pool ----------------------------------------------------
    def pool(self, conn):
        """xenlab's directory pool on the host (made once: under the user's home,
        or /var/lib/xenlab as root), refreshed: each call is a few round trips,
        so callers look it up once for their uploads and deletes."""
        def place() -> str:
            home = self.run("printf %s \"$HOME\"").decode()
            return "/var/lib/xenlab/pool" if self.user == "root" else f"{home}/.local/share/xenlab/pool"

        try:
            return virt.dir_pool(conn, POOL, place)
        except virt.error_class() as e:
            raise LabError(f"cannot make storage pool {POOL!r} on {self.where}: {e}") from None

    def check_space(self, pool, files: dict[str, Path], also: int = 0) -> None:
        """Refuse, before anything is sent, when the pool has no room for the
        files still to upload plus `also` bytes."""
        sizes = {name: path.stat().st_size for name, path in files.items()}
        needed = sum(size for name, size in sizes.items() if not virt.volume_path(pool, name, size)) + also
        available = virt.pool_free_bytes(pool)
        if needed > available:
            raise LabError(f"the storage pool {POOL!r} on {self.where} ({virt.pool_dir(pool)}) has {available >> 20} MiB free; "
                           f"this lab needs {needed >> 20} MiB there ({(needed - also) >> 20} MiB to upload, {also >> 20} MiB for its disk)",
                           "free space on that host's filesystem, or remove xenlab's unused volumes there "
                           f"(`virsh -c '{self.uri}' vol-list {POOL}`)")

    def upload(self, pool, local: Path, name: str) -> str:
        """`local` as volume `name` in the pool (kept: a volume of that name and
        size is that file, as names come from content-addressed cache entries);
        its path on the host."""
        size = local.stat().st_size
        if done := virt.volume_path(pool, name, size):
            return done
        virt.delete_volumes(pool, name)  # a half-made upload: its size is the file's only once complete
        try:
            return virt.upload_volume(pool, local, name, size)
        except virt.error_class() as e:
            raise LabError(f"uploading {local.name} ({size >> 20} MiB) to {self.where} failed: {e}",
                           "check the space in the pool's directory on that host") from None

    def overlay(self, pool, name: str, backing: str, capacity: int) -> str:
        """A new qcow2 volume backed by the qcow2 volume at `backing`; its path."""
        virt.delete_volumes(pool, name)
        try:
            return virt.qcow2_overlay(pool, name, backing, capacity)
        except virt.error_class() as e:
            raise LabError(f"cannot make the lab's disk {name} on {self.where}: {e}",
                           "libvirt makes it with qemu-img: install qemu-utils there") from None

    @staticmethod
    def file_path(pool, name: str) -> str:
        """Where a file named `name` in the pool's directory is (for QEMU's serial log)."""
        return f"{virt.pool_dir(pool)}/{name}"

    @staticmethod
    def delete(pool, *names: str) -> None:
        virt.delete_volumes(pool, *names)
