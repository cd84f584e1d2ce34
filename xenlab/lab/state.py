"""A lab's state: its directory, files and lock, the state it is in (from
its files and its QEMU process, without libvirt), and its SSH session.

State lives in <state>/labs/NAME: lab.json (what `up` started), the lab's SSH
key and pinned known_hosts, dom0's copy-on-write disk, the serial log and,
for the default embedded driver, libvirt's own root."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Self

from xenlab import config as config_mod
from xenlab.agent.sysutil import atomic_write
from xenlab.build import dom0 as images
from xenlab.config import LabConfig, validate_name
from xenlab.errors import LabError
from xenlab.lab import virt
from xenlab.lab.remote import RemoteHost
from xenlab.lab.ssh import SSHSession
from xenlab.paths import cache_dir, lab_dir, private, state_root
from xenlab.run import pid_alive

# Shell builtins only (read, kill, test) but for one xenstore-read: every
# process start in dom0 costs ~100 ms or more under TCG.
READY_CHECK = (
    "for p in xenstored xenconsoled; do read -r pid < /run/$p.pid && kill -0 $pid 2>/dev/null && echo proc:$p; done; "
    "for d in " + " ".join(images.XEN_DEVICES) + "; do [ -e /dev/xen/$d ] && echo dev:$d; done; "
    "xenstore-read domid >/dev/null 2>&1 && echo xs:answers"
)
REQUIRED_READY = {"proc:xenstored", "proc:xenconsoled", "dev:evtchn", "dev:gntdev", "dev:gntalloc", "xs:answers"}

# What `status` can say of a lab, each decided from its state files and the
# QEMU process (no libvirt call for local labs: an `up` in progress holds the
# embedded driver, and a dead VM must be named at once, not after an SSH timeout).
STATES = {
    "down": "no VM, nothing running",
    "booting": "an `xenlab up` is booting it",
    "up": "the VM runs and dom0 answers",
    "unreachable": "the VM runs but dom0 does not answer SSH (or a remote lab's libvirt host does not answer)",
    "gone": "the VM died after the lab was up",
    "orphaned": "a VM without a finished `xenlab up` (that `up` was interrupted)",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


@contextmanager
def ports_lock():
    """One host-wide lock for picking a lab's SSH port."""
    root = state_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".ports.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def list_labs() -> list[str]:
    """Every lab with state on this host: up, booting, or left by an interrupted command."""
    root = state_root()
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any((p / f).exists() for f in ("lab.json", "booting.json", "serial.log")))


class LabState:
    """A lab's name, configuration, files and lock, and the state it is in."""

    def __init__(self, cfg: LabConfig):
        self.cfg = cfg
        self.name = validate_name(cfg.name)
        self.dir = lab_dir(self.name)
        self.domain_name = f"xenlab-{self.name}"
        self.booted = False  # set by ensure_up() when it booted the lab

    # -- files -------------------------------------------------------------
    info_file = property(lambda self: self.dir / "lab.json")

    key_file = property(lambda self: self.dir / "id_ed25519")

    known_hosts = property(lambda self: self.dir / "known_hosts")

    serial_log = property(lambda self: self.dir / "serial.log")

    disk = property(lambda self: self.dir / "dom0.qcow2")

    boot_marker = property(lambda self: self.dir / "booting.json")  # from domain start until ready

    @property
    def embed_root(self) -> Path:
        """libvirt's embed root: the lab's libvirt/ directory, or a short alias
        (a symlink beside the labs, made by _connect) when that path is too long
        for libvirt's sockets."""
        root = self.dir / "libvirt"
        if virt.embed_root_fits(root):
            return root
        return state_root().parent / "r" / hashlib.sha256(self.name.encode()).hexdigest()[:12]

    def _link_embed_root(self) -> None:
        root, target = self.embed_root, self.dir / "libvirt"
        if root == target:
            return
        if not virt.embed_root_fits(root):
            raise LabError(f"the lab's state path {target} is too long for libvirt's monitor socket "
                           f"(UNIX socket paths hold 107 bytes)",
                           hint="set XENLAB_STATE (or XDG_STATE_HOME) to a shorter directory")
        private(target)  # libvirt makes its directories through the link
        if not root.is_symlink() or os.readlink(root) != str(target):
            private(root.parent)
            root.unlink(missing_ok=True)
            root.symlink_to(target)

    @classmethod
    def open(cls, name: str | None = None, config: str | Path | None = None, **overrides) -> Self:
        """The lab NAME (default: [lab] name) configured by the defaults, then
        the TOML file `config`, then `overrides` (e.g. memory="3G", **{"dom0.vcpus": 1})."""
        return cls(config_mod.load(Path(config) if config else None, {"name": name, **overrides}))

    def info(self) -> dict | None:
        """What the last finished `up` reported (None before one finished)."""
        return _read_json(self.info_file)

    @property
    def remote(self) -> RemoteHost | None:
        """The libvirt host when the lab's URI names another host (qemu+ssh://...)."""
        return RemoteHost.of(self.uri())

    def running_config(self) -> LabConfig:
        """The configuration the lab was started with (whatever this handle was
        opened with); this handle's before a first `up`."""
        info = self.info()
        return config_mod.LabConfig.from_dict(info["config"]) if info else self.cfg

    def uri(self) -> str:
        info = self.info()
        if info:
            return info["uri"]
        return self.cfg.connect or virt.embed_uri(self.embed_root)

    @contextmanager
    def locked(self, purpose: str = "", on_wait=None):
        """Serialize commands on one lab (the embed root admits one process anyway).
        The holder writes its pid and purpose into the lock file, so a waiter can
        say whom it waits for (`on_wait(holder)`), and `down` can stop an `up`."""
        private(self.dir)
        with open(self.dir / "lock", "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    f.seek(0)
                    on_wait(f.read().split())
                fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()} {purpose}\n")
            f.flush()
            yield

    def lock_holder(self) -> tuple[int, str] | None:
        """(pid, purpose) of the command holding this lab's lock, or None."""
        try:
            with open(self.dir / "lock") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    return None
                except BlockingIOError:
                    words = f.read().split()
        except OSError:
            return None
        return (int(words[0]), words[1] if len(words) > 1 else "") if words and words[0].isdigit() else None

    def qemu_alive(self) -> bool | None:
        """Whether this lab's QEMU runs, from its pid file and /proc (None: cannot tell, e.g. a remote URI)."""
        if not self.uri().startswith(("qemu:///embed", "qemu:///system")):
            return None
        pid = self._qemu_pid() or (self.info() or {}).get("qemu_pid")
        if not pid:
            return False
        return virt.runs_domain(pid, self.domain_name)

    def state(self) -> tuple[str, str]:
        """(one of STATES, a line saying why), quickly: "unreachable" only for a
        remote lab whose host does not answer (dom0's SSH is status()'s to try)."""
        info, marker = self.info(), _read_json(self.boot_marker)
        qemu = self.qemu_alive()
        if qemu is None:  # remote: ask libvirt (without the lab's lock, which `up` may hold)
            try:
                qemu = self._vm_running()
            except (LabError, virt.error_class()) as e:
                if not (host := self.remote):
                    raise
                return "unreachable", f"its libvirt host {host.where} does not answer ({_reason(e)})"
        if marker and not info:
            pid = marker.get("pid", 0)
            if pid_alive(pid) and (holder := self.lock_holder()) and holder[0] == pid:
                return "booting", f"`xenlab up` (pid {pid}) is booting it, for {time.time() - marker.get('started_at', time.time()):.0f} s so far"
            if qemu:
                return "orphaned", f"its `xenlab up` (pid {pid}) ended before the lab was ready; the VM still runs"
            return "down", "an interrupted boot left its files; nothing runs"
        if info:
            if not qemu:
                return "gone", f"the lab VM (QEMU pid {info.get('qemu_pid')}) is no longer running; see {self.serial_log}"
            return "up", "the VM runs"
        if qemu:
            return "orphaned", "a VM of this lab runs without a finished `xenlab up`"
        return "down", "nothing runs"

    def _connect(self, lock_wait: float = 30.0):
        if self.uri().startswith("qemu:///embed"):
            self._link_embed_root()
            virt.prepare_embed_root(self.embed_root, cache_dir() / "libvirt-qemu-cache")
        return virt.connect(self.uri(), lock_wait=lock_wait)

    def _qemu_log(self) -> Path:
        return self.embed_root / "log" / "qemu" / f"{self.domain_name}.log"

    def _qemu_pid(self) -> int | None:
        # Embedded driver: under the lab's root; a local system daemon: /run/libvirt/qemu.
        candidates = list(self.embed_root.glob(f"run/**/{self.domain_name}.pid"))
        if self.uri() == "qemu:///system":
            candidates.append(Path("/run/libvirt/qemu") / f"{self.domain_name}.pid")
        for candidate in candidates:
            try:
                return int(candidate.read_text().strip())
            except (OSError, ValueError):
                pass
        return None

    def require_up(self) -> dict:
        state, why = self.state()
        if state != "up":
            hint = {"booting": "wait for it to finish",
                    "unreachable": f"when the host answers again the lab may still run there; `xenlab down --lab {self.name}` removes it",
                    "gone": f"`xenlab up --lab {self.name}` boots it again (the serial log: {self.serial_log})",
                    "orphaned": f"`xenlab up --lab {self.name}` restarts the boot, `xenlab down --lab {self.name}` removes it"}
            detail = "" if state == "down" else f": it is {state} ({why})"
            raise LabError(f"lab {self.name!r} is not up{detail}", hint.get(state, f"start it with `xenlab up --lab {self.name}`"))
        info = self.info()
        if info is None:  # a `down` removed it since state() read it
            raise LabError(f"lab {self.name!r} is not up: it was stopped just now", f"start it with `xenlab up --lab {self.name}`")
        return info

    def _session(self, port: int, host_key: str) -> SSHSession:
        """An SSH session to dom0 (not yet connected): on this host's loopback,
        or through the remote libvirt host's SSH."""
        host = self.remote
        if host is None:
            return SSHSession(port, self.key_file, host_key)
        return SSHSession(port, self.key_file, host_key, sock_factory=lambda: host.tunnel(port), via=host.where)

    def ssh(self, timeout: float = 15.0) -> SSHSession:
        info = self.require_up()
        image = images.Dom0Image(images.images_dir() / info["image_id"])
        return self._session(info["ssh_port"], image.host_key).connect(timeout=timeout)

    def running(self) -> bool:
        with self.locked():
            return self._vm_running()

    def _vm_running(self) -> bool:
        with self._connect() as conn:
            dom = virt.lookup(conn, self.domain_name)
            return dom is not None and virt.is_running(dom)


def _reason(e: Exception) -> str:
    """What went wrong, without a hint: a LabError's message, or libvirt's error text."""
    return getattr(e, "message", None) or str(e)


def tail_lines(f: BinaryIO, lines: int, block: int = 65536) -> list[bytes]:
    """The last `lines` complete lines of the open file `f`, which is left at its end."""
    end = f.seek(0, os.SEEK_END)
    start, data = end, b""
    while start > 0 and data.count(b"\n") <= lines:
        start = max(0, start - block)
        f.seek(start)
        data = f.read(end - start)
    f.seek(end)
    found = data.split(b"\n")
    if found and found[-1] == b"":
        found.pop()
    return found[-lines:] if lines > 0 else []


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    """Whole or not at all: a reader never sees half a file."""
    atomic_write(path, json.dumps(data, indent=2))
