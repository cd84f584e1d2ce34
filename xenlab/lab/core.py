"""The Lab: one Xen + dom0 VM under libvirt, with its state directory.

State lives in <state>/labs/NAME: lab.json (what `up` started), the lab's SSH
key and pinned known_hosts, dom0's copy-on-write disk, the serial log and,
for the default embedded driver, libvirt's own root."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from xenlab import config as config_mod
from xenlab import templates
from xenlab.agent.xl import parse_xl_info, parse_xl_list
from xenlab.build import dom0 as images
from xenlab.build.boot import BootFiles, boot_files
from xenlab.config import LabConfig, validate_name
from xenlab.errors import BootError, ConfigError, LabError, SSHError
from xenlab.lab import accel as accel_mod
from xenlab.lab import serial, versions, virt
from xenlab.lab import snapshot as snapshots
from xenlab.lab.remote import RemoteHost
from xenlab.lab.snapshot import SnapshotError
from xenlab.lab.ssh import SSHSession, generate_key, known_hosts_line
from xenlab.paths import TEMPLATES_DIR, cache_dir, lab_dir, private, state_root
from xenlab.progress import Steps
from xenlab.run import pid_alive, process_age, run

if TYPE_CHECKING:
    from xenlab.guest.manager import Guests
    from xenlab.lab.dom0 import Dom0

# Shell builtins only (read, kill, test) but for one xenstore-read: every
# process start in dom0 costs ~100 ms or more under TCG.
READY_CHECK = (
    "for p in xenstored xenconsoled; do read -r pid < /run/$p.pid && kill -0 $pid 2>/dev/null && echo proc:$p; done; "
    "for d in " + " ".join(images.XEN_DEVICES) + "; do [ -e /dev/xen/$d ] && echo dev:$d; done; "
    "xenstore-read domid >/dev/null 2>&1 && echo xs:answers"
)
# A restored lab runs from the first instruction after the save: dom0 answers
# at once or something is wrong with the snapshot (then: a cold boot).
RESTORE_READY_SECONDS = 30.0
REQUIRED_READY = {"proc:xenstored", "proc:xenconsoled", "dev:evtchn", "dev:gntdev", "dev:gntalloc", "xs:answers"}

# Room a remote lab needs in the pool beyond its uploads: its disk overlay
# grows with what dom0 and its guests write, and the serial log.
REMOTE_DISK_HEADROOM = 256 << 20

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


class Lab:
    """One lab: Xen + dom0 in a libvirt domain, named by its config.

    `Lab.open("mylab")` reads the configuration (defaults, a TOML file,
    overrides); `ensure_up()` boots it unless it is up; `dom0()` and
    `guests()` are the handles to work in it; `down()` stops it."""

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
    def open(cls, name: str | None = None, config: str | Path | None = None, **overrides) -> Lab:
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
            except (LabError, virt.library().libvirtError) as e:
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

    # -- up ----------------------------------------------------------------
    def up(self, steps: Steps, cold: bool = False) -> dict:
        """Boot the lab, or restore it from a matching snapshot unless `cold`."""
        fresh = not self.dir.exists()
        try:
            return self._up(steps, cold)
        except BaseException:
            # Failed before a VM started: nothing is booting any more.
            marker = _read_json(self.boot_marker)
            if marker and marker.get("pid") == os.getpid() and not marker.get("vm_started"):
                self.boot_marker.unlink(missing_ok=True)
            # A refused first `up` leaves no state directory; once a boot was
            # tried, its serial log stays as the evidence the error names.
            if fresh and not self.serial_log.exists():
                shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _up(self, steps: Steps, cold: bool) -> dict:
        started = time.monotonic()
        waited: list = []

        def wait_note(holder):
            waited.append(holder)
            steps.note(f"waiting for another xenlab command on lab {self.name} (pid {' '.join(holder) or '?'})")

        was_up = self.state()[0] == "up"
        with self.locked("up", on_wait=wait_note):
            state, why = self.state()
            if state == "up" and (info := self.info()):
                # As `vagrant up`: a lab already up as asked is used as it is.
                asked = self.cfg.differences(config_mod.LabConfig.from_dict(info["config"]))
                if asked:
                    raise LabError(f"lab {self.name!r} is already up with another configuration ({'; '.join(asked)})",
                                   f"stop it first (`xenlab down --lab {self.name}`) to boot it so, or leave out what differs")
                if waited and not was_up:
                    steps.note(f"lab {self.name} was booted meanwhile by the command we waited for")
                else:
                    steps.note(f"lab {self.name} is already up (SSH on 127.0.0.1:{info.get('ssh_port', '?')}): nothing to do")
                return info
            if state in ("orphaned", "gone"):
                steps.note(f"lab {self.name} is {state} ({why}): removing what is left and booting again")
                self._stop_domain()
            if self._refuse_if_running(leftover=state == "down"):
                steps.note(f"lab {self.name}: removed a VM that libvirt ran for it although its files say down")
            return self._start(steps, started, cold)

    def reset(self, steps: Steps) -> dict:
        """Put a running lab back to its state right after boot, in place: its
        snapshot restored (all guests gone, dom0's memory and disk as after
        boot), same name and, when still free, the same SSH port. Without a
        usable snapshot it boots cold and says why."""
        with self.locked("reset"):
            info = self.info() if self.state()[0] == "gone" else self.require_up()  # a dead VM is reset too
            if info is None:
                raise LabError(f"lab {self.name!r} is not up", f"start it with `xenlab up --lab {self.name}`")
            self.cfg = config_mod.LabConfig.from_dict(info["config"])  # as it was started, whatever the flags of this call
            started = time.monotonic()
            with steps.step(f"stop lab {self.name}"):
                self._stop_domain()
            return self._start(steps, started, cold=False, port_hint=info["ssh_port"])

    def _start(self, steps: Steps, started: float, cold: bool, port_hint: int = 0) -> dict:
        began = time.time()
        try:
            return self._boot_or_restore(steps, started, cold, port_hint)
        except BaseException:
            # Interrupted while libvirt probed QEMU, the probe outlives us (it
            # daemonizes); under the lab's lock only we probe the lab's root.
            self._end_stray_probes(started_after=began)
            raise

    def _boot_or_restore(self, steps: Steps, started: float, cold: bool, port_hint: int) -> dict:
        # From here `status` says booting (building, choosing, starting) until ready or failed.
        _write_json(self.boot_marker, {"pid": os.getpid(), "started_at": time.time()})
        image = images.build(self.cfg, steps)
        boot = boot_files(image, self.cfg)  # the user's Xen or dom0 kernel checked before anything starts
        with steps.step("choose accelerator"):
            if remote := self.remote:  # nothing to probe KVM with here: the VM runs there
                choice = accel_mod.AccelChoice("kvm" if self.cfg.accel == "kvm" else "tcg",
                                               f"{self.cfg.accel} on the remote host {remote.where} (not probed)")
            else:
                choice = accel_mod.choose(self.cfg.accel, image.kernel)
            steps.note(f"{choice.accel}: {choice.reason}")
        identity = self._identity(image, boot, choice.accel)
        key = snapshots.key_of(identity)
        # Snapshots live in this user's cache: only the embedded driver (QEMU
        # as this user, on this host) can save and restore them.
        embedded = self.uri().startswith("qemu:///embed")
        use_snapshots = self.cfg.snapshots and embedded
        with self._connect() as conn:
            if use_snapshots and not cold:
                snap, reason = self._usable_snapshot(key, identity, steps)
                if snap is not None:
                    try:
                        return self._restore(conn, snap, image, boot, choice, steps, started, port_hint)
                    except SnapshotError as e:
                        snap.remove()
                        reason = f"snapshot {snap.key} was removed: {e.message}"
                steps.note(f"booting cold: {reason}")
            else:
                why = ("--cold" if cold else "snapshots are off ([lab] snapshots = false)" if not self.cfg.snapshots
                       else f"snapshots need the embedded driver, not {self.uri().split('?')[0]}")
                steps.note(f"booting cold: {why}")
            return self._cold_boot(conn, image, boot, choice, steps, started, port_hint, identity if use_snapshots else None)

    def _cold_boot(self, conn, image, boot, choice, steps: Steps, started: float, port_hint: int, identity: dict | None) -> dict:
        uri = self.uri()
        # Held from choosing the SSH port until QEMU has bound it, so
        # labs started side by side never pick the same free port.
        remote = self.remote
        with ports_lock():
            port = remote.free_port() if remote else self._pick_port(port_hint)
            with steps.step("prepare lab state"):
                self._prepare(image, port)
            placed = None
            if remote:
                with steps.step(f"upload the boot files and dom0's disk to {remote.where}"):
                    placed = self._place_remote(conn, image, boot)
            xml = self.domain_xml(boot, choice.accel, port, placed=placed)
            (self.dir / "domain.xml").write_text(xml)
            with steps.step(f"start libvirt domain {self.domain_name} ({uri.split('?')[0]})"):
                boot_start = time.monotonic()
                dom = self._create(conn, xml, port)
                self._mark_started(uri, port)
        cancel_ssh = threading.Event()
        try:
            with steps.step("boot Xen and dom0"):
                ssh_ready = self._wait_ready(dom, steps, boot_start, lambda: self._start_ssh_check(image, boot, port, cancel_ssh))
            with steps.step("SSH and dom0 services"):
                ssh_ready.result(timeout=self.cfg.boot_timeout)
        except BaseException:
            cancel_ssh.set()
            virt.destroy(dom)
            self._remove_runtime_files()
            self._remove_remote_files(conn)
            raise
        ready = time.monotonic()
        info = self._info(image, boot, choice, port, steps, started, boot_start, ready, snapshot=None)
        if identity is None:
            return self._publish_info(info)
        try:
            snap = self._save_snapshot(dom, snapshots.key_of(identity), identity, steps, ready - boot_start)
        except SnapshotError as e:
            if virt.is_running(dom):
                steps.note(f"no snapshot saved: {e.message}")
                return self._publish_info(info)
            # The save stopped the VM but left nothing usable: boot again, without.
            steps.note(f"no snapshot saved: {e.message}; booting cold again")
            self._remove_runtime_files()
            return self._cold_boot(conn, image, boot, choice, steps, started, port, None)
        try:
            return self._restore(conn, snap, image, boot, choice, steps, started, port, cold_boot_seconds=ready - boot_start)
        except SnapshotError as e:
            snap.remove()
            steps.note(f"the new snapshot {snap.key} did not restore ({e.message}); it was removed; booting cold again")
            return self._cold_boot(conn, image, boot, choice, steps, started, port, None)

    def _mark_started(self, uri: str, port: int) -> None:
        _write_json(self.boot_marker, {"pid": os.getpid(), "started_at": time.time(), "uri": uri,
                                       "ssh_port": port, "qemu_pid": self._qemu_pid(), "vm_started": True})

    def _info(self, image, boot, choice, port: int, steps: Steps, started: float, boot_start: float, ready: float,
              snapshot: dict | None) -> dict:
        return {
            "name": self.name,
            "uri": self.uri(),
            "domain": self.domain_name,
            "ssh_port": port,
            "image_id": image.id,
            "versions": {"remote_host": remote.where} if (remote := self.remote) else versions.versions(self.cfg.qemu),
            "boot": boot.to_dict(),
            "accel": choice.accel,
            "accel_reason": choice.reason,
            "cpu": "host" if choice.accel == "kvm" else self.cfg.cpu,
            "qemu_pid": self._qemu_pid(),
            "started_at": time.time() - (ready - boot_start),
            "boot_seconds": round(ready - boot_start, 2),
            "up_seconds": round(ready - started, 2),
            "restored": snapshot is not None,
            "snapshot": snapshot,
            "timings": steps.timings,
            "serial_log": str(self.serial_log),
            **({"remote_serial_log": self._remote_serial} if self.remote else {}),
            "state_dir": str(self.dir),
            "config": self.cfg.to_dict(),
        }

    def _publish_info(self, info: dict) -> dict:
        _write_json(self.info_file, info)
        self.boot_marker.unlink(missing_ok=True)
        return info

    # -- snapshots ---------------------------------------------------------
    def _identity(self, image, boot: BootFiles, accel: str) -> dict:
        """Everything a snapshot must share with this lab's boot to stand in for it."""
        xen_cmdline, dom0_cmdline = self._cmdlines(authkey="")
        return {
            "format": snapshots.SNAPSHOT_FORMAT,
            "image_id": image.id,
            "boot": boot.to_dict(),
            "xen_cmdline": xen_cmdline,
            "dom0_cmdline": dom0_cmdline,
            "memory": self.cfg.memory,
            "vcpus": self.cfg.vcpus,
            "cpu": self.cfg.cpu,
            "accel": accel,
            "qemu": versions.qemu_version(self.cfg.qemu),
            "libvirt": versions.libvirt_version(),
            "emulator": self._emulator(),
            # The VM's hardware (CPU features, devices) is the template's: a
            # snapshot must not stand in for a VM defined otherwise.
            "domain_template": hashlib.sha256((TEMPLATES_DIR / "domain.xml.j2").read_bytes()).hexdigest()[:16],
        }

    def _usable_snapshot(self, key: str, identity: dict, steps: Steps) -> tuple[snapshots.Snapshot | None, str]:
        """(the snapshot to restore, "") or (None, why there is none)."""
        notes = []
        for other in snapshots.all_snapshots():
            old = other.manifest.get("identity", {})
            if other.key != key and snapshots.can_never_load(old, identity["libvirt"]) and not other.users():
                other.remove()
                steps.note(f"removed snapshot {other.key} ({'; '.join(snapshots.differences(old, identity))})")
        snap = snapshots.find(key)
        if snap is not None:
            problem = snap.problem()
            if problem is None:
                return snap, ""
            snap.remove()
            notes.append(f"snapshot {key} was removed: {problem}")
            return None, "; ".join(notes)
        newest = snapshots.all_snapshots()[-1:]
        if newest:
            changed = snapshots.differences(newest[0].manifest.get("identity", {}), identity)
            notes.append(f"no snapshot of this configuration yet (the newest differs: {', '.join(changed)})")
        else:
            notes.append("no snapshot saved yet")
        return None, "; ".join(notes)

    def _save_snapshot(self, dom, key: str, identity: dict, steps: Steps, cold_boot_seconds: float) -> snapshots.Snapshot:
        """Save the ready VM (it stops) and freeze its disk layer as the snapshot's."""
        stage = snapshots.staging(key)
        try:
            with steps.step(f"save snapshot {key}"):
                uuid = dom.UUIDString()
                try:
                    dom.saveFlags(str(stage / "memory.save"), None, virt.save_running_flag())
                except virt.error_class() as e:
                    raise snapshots.SnapshotError(f"libvirt could not save the lab: {e}") from None
                try:
                    _move(self.disk, stage / "disk.qcow2")
                    for src, name in ((self.key_file, "id_ed25519"), (self.key_file.with_suffix(".pub"), "id_ed25519.pub"),
                                      (self.serial_log, "serial.log")):
                        shutil.copyfile(src, stage / name)
                        (stage / name).chmod(0o600)
                    return snapshots.publish(stage, key, self.name, identity,
                                             {"uuid": uuid, "domain": self.domain_name,
                                              "cold_boot_seconds": round(cold_boot_seconds, 2)})
                except OSError as e:
                    raise snapshots.SnapshotError(f"could not write the snapshot: {e}") from None
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def _restore(self, conn, snap: snapshots.Snapshot, image, boot: BootFiles, choice, steps: Steps, started: float,
                 port_hint: int, cold_boot_seconds: float | None = None) -> dict:
        """Run this lab from `snap`; SnapshotError (and nothing left running) when it cannot."""
        manifest = snap.manifest
        uri = self.uri()
        with ports_lock():
            port = self._pick_port(port_hint)
            with steps.step(f"restore snapshot {snap.key}"):
                restore_start = time.monotonic()
                self._prepare_restore(snap, image, port)
                xml = self.domain_xml(boot, choice.accel, port, uuid=manifest.get("uuid"))
                (self.dir / "domain.xml").write_text(xml)
                source = snap.memory
                if manifest.get("domain") == self.domain_name:
                    digest = _digest_async(snap)  # read beside QEMU's own read of the file: no wall time
                else:
                    source = self.dir / "restore.save"  # removed once QEMU has read it
                    digest = Future()
                    try:
                        digest.set_result(snap.renamed_copy(source, self.domain_name))
                    except (OSError, SnapshotError) as e:
                        source.unlink(missing_ok=True)
                        self._remove_runtime_files()
                        raise SnapshotError(getattr(e, "message", str(e))) from None
                try:
                    conn.restoreFlags(str(source), xml, virt.save_running_flag())
                except virt.error_class() as e:
                    self._remove_runtime_files()
                    raise SnapshotError(f"libvirt could not restore it: {e}") from None
                finally:
                    if source != snap.memory:
                        source.unlink(missing_ok=True)
                self._mark_started(uri, port)
        try:
            # The digest first: a corrupt image may leave a dom0 that never answers.
            with steps.step("snapshot digest"):
                if digest.result() != manifest.get("memory_sha256"):
                    raise SnapshotError("its memory file does not match its digest (corrupt)")
            with steps.step("dom0 answers (clock set)"):
                clock_offset = self._check_restored(image, port)
        except BaseException as e:
            dom = virt.lookup(conn, self.domain_name)
            if dom is not None:
                virt.destroy(dom)
            self._remove_runtime_files()
            if isinstance(e, (SSHError, BootError)):
                raise SnapshotError(f"the restored lab did not become ready: {e.message}") from None
            raise
        ready = time.monotonic()
        detail = {"key": snap.key, "path": str(snap.path), "clock_offset_seconds": clock_offset,
                  "saved_now": cold_boot_seconds is not None,
                  "cold_boot_seconds": round(cold_boot_seconds or manifest.get("cold_boot_seconds") or 0, 2)}
        info = self._info(image, boot, choice, port, steps, started, restore_start, ready, snapshot=detail)
        return self._publish_info(info)

    def _prepare_restore(self, snap: snapshots.Snapshot, image, port: int) -> None:
        # dom0 in the snapshot trusts the key that was on its boot command line.
        for name in ("id_ed25519", "id_ed25519.pub"):
            dest = self.dir / name
            dest.unlink(missing_ok=True)
            shutil.copyfile(snap.path / name, dest)
            dest.chmod(0o600)
        self.known_hosts.write_text(known_hosts_line(port, image.host_key))
        if self.serial_log.exists():
            self.serial_log.replace(self.dir / "serial.log.old")
        # The cold boot's console first, so the log tells the whole story.
        shutil.copyfile(snap.serial_log, self.serial_log)
        with open(self.serial_log, "a") as f:
            f.write(f"\n--- xenlab: lab {self.name} restored from snapshot {snap.key} at {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n")
        self.disk.unlink(missing_ok=True)
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", snap.disk, self.disk])

    def _check_restored(self, image, port: int) -> float:
        """dom0 answers SSH and its services run; its clock (stopped at the
        save) set to the host's. Returns dom0's clock offset after setting it."""
        with SSHSession(port, self.key_file, image.host_key).connect(timeout=RESTORE_READY_SECONDS) as ssh:
            # dom0's monotonic clock read last, just before the output comes
            # back: host time at the answer ~ dom0 uptime then. dom0 then sets
            # its clock from that map at the instant `date` runs, so the exec
            # latency of `date` does not count.
            out = ssh.check(f"{READY_CHECK}; read -r up _ < /proc/uptime; echo uptime:$up", timeout=RESTORE_READY_SECONDS)
            delta = time.time() - float(out.rsplit("uptime:", 1)[1])
            missing = REQUIRED_READY - set(out.split())
            if missing:
                raise BootError(f"dom0 answers SSH but is missing: {', '.join(sorted(missing))}", f"see {self.serial_log}")
            # In bash's own arithmetic and clock (root's shell in the image):
            # `date -s` is the one process this starts; each start costs tens
            # of ms in a restored dom0, whose QEMU has translated nothing yet.
            dom0_now = float(ssh.check(
                f"read -r up _ < /proc/uptime; c=$(( ${{up%.*}} * 100 + 10#${{up#*.}} + {round(delta * 100)} )); "
                "printf -v f %02d $(( c % 100 )); date -u -s @$(( c / 100 )).$f >/dev/null; echo $EPOCHREALTIME",
                timeout=RESTORE_READY_SECONDS))
            return round(dom0_now - time.time(), 3)

    def _refuse_if_running(self, leftover: bool = False) -> bool:
        """Refuse when the lab's VM runs, unless it is a `leftover`: one that a
        command killed while libvirt started it (a restore) left before any
        file named it (the caller holds the lab's lock). Whether a running VM was removed."""
        dropped = None
        if leftover and self.uri().startswith("qemu:///embed"):
            # Killed mid-restore, that command may have left libvirt's job recorded too.
            dropped = virt.drop_dead_record(self.embed_root, self.domain_name)
        with self._connect() as conn:
            dom = virt.lookup(conn, self.domain_name)
            running = dom is not None and virt.is_running(dom)
            if running and not leftover:
                port = (self.info() or {}).get("ssh_port", "?")
                raise LabError(
                    f"lab {self.name!r} is already up (domain {self.domain_name}, SSH on 127.0.0.1:{port})",
                    f"use it, stop it with `xenlab down --lab {self.name}`, or pick another --lab",
                )
            if dom is not None:
                virt.destroy(dom)  # a stopped leftover definition, or that running leftover
        self._remove_runtime_files()
        return running or dropped is not None

    def _pick_port(self, hint: int = 0) -> int:
        """The configured port, else `hint` (a reset keeps its port) while free, else a free one."""
        if hint and not self.cfg.ssh_port and not port_in_use(hint):
            return hint
        if self.cfg.ssh_port:
            if port_in_use(self.cfg.ssh_port):
                raise LabError(
                    f"port 127.0.0.1:{self.cfg.ssh_port} is already in use",
                    "choose another ssh_port, or 0 to let xenlab pick a free one",
                )
            return self.cfg.ssh_port
        return free_port()

    def _prepare(self, image: images.Dom0Image, port: int) -> None:
        generate_key(self.key_file)
        self.known_hosts.write_text(known_hosts_line(port, image.host_key))
        if self.serial_log.exists():
            self.serial_log.replace(self.dir / "serial.log.old")
        self.serial_log.touch()
        if not self.remote:
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", image.rootfs, self.disk])

    # -- a lab on a remote libvirt host --------------------------------------
    def _remote_names(self) -> tuple[str, str]:
        """The lab's own volumes in the remote pool: its disk and its serial log."""
        return f"lab-{self.name}.qcow2", f"lab-{self.name}-serial.log"

    def _place_remote(self, conn, image: images.Dom0Image, boot: BootFiles) -> dict:
        """Upload what the VM reads (once per cache entry) and make the lab's
        disk there; the remote paths for the domain XML."""
        host = self.remote
        if host is None:
            raise LabError(f"lab {self.name!r} has no remote host", "this is for a lab on a remote libvirt host ([lab] connect)")
        host.check_qemu(conn)
        pool = host.pool(conn)
        rootfs = images.rootfs_qcow2(image)  # about a fifth of the raw image's 2 GiB to send
        # Named by their cache entries (recipe- or content-hashed directories).
        uploads = {kind: (path, f"{path.parent.name}-{path.name}")
                   for kind, path in (("xen", boot.xen), ("dom0_kernel", boot.dom0_kernel), ("initramfs", boot.initramfs))}
        uploads["backing"] = (rootfs, f"{image.id}-{rootfs.name}")
        host.check_space(pool, {name: path for path, name in uploads.values()}, also=REMOTE_DISK_HEADROOM)
        files = {kind: host.upload(pool, path, name) for kind, (path, name) in uploads.items()}
        backing = files.pop("backing")
        disk_name, serial_name = self._remote_names()
        host.delete(pool, serial_name)
        files["disk"] = host.overlay(pool, disk_name, backing, image.rootfs.stat().st_size)
        files["serial_log"] = self._remote_serial = host.file_path(pool, serial_name)
        return files

    def _remove_remote_files(self, conn) -> None:
        if host := self.remote:
            host.delete(host.pool(conn), *self._remote_names())

    def _mirror_serial(self, host: RemoteHost, remote_path: str | None = None) -> None:
        """Append what QEMU wrote to the serial log on the remote host since the last call."""
        offset = self.serial_log.stat().st_size if self.serial_log.exists() else 0
        more = host.read_from(remote_path or self._remote_serial, offset)
        if more:
            with open(self.serial_log, "ab") as f:
                f.write(more)

    def fresh_serial_log(self) -> Path:
        """The serial log, brought up to date first when QEMU writes it on a
        remote host (best effort: a host that does not answer leaves what was
        copied so far)."""
        host, info = self.remote, self.info()
        if host and info and info.get("remote_serial_log"):
            try:
                self._mirror_serial(host, info["remote_serial_log"])
            except (LabError, OSError):
                pass
        return self.serial_log

    def console_lines(self, lines: int = 40, follow: bool = False, poll: float = 0.5) -> Iterator[str]:
        """The last `lines` lines of the serial log (Xen and dom0's console),
        then, with `follow`, each new line as it comes (also from a remote host)."""
        path = self.fresh_serial_log()
        if not path.exists():
            raise LabError(f"no serial log for lab {self.name} ({path})", f"start the lab with `xenlab up --lab {self.name}`")
        return self._console_lines(path, lines, follow, poll)

    def _console_lines(self, path: Path, lines: int, follow: bool, poll: float) -> Iterator[str]:
        with open(path, "rb") as f:
            yield from (line.decode(errors="replace") for line in tail_lines(f, lines))
            partial = b""
            while follow:
                chunk = f.read()
                if not chunk:
                    time.sleep(poll)
                    self.fresh_serial_log()
                    continue
                *done, partial = (partial + chunk).split(b"\n")
                yield from (line.decode(errors="replace") for line in done)

    def _session(self, port: int, host_key: str) -> SSHSession:
        """An SSH session to dom0 (not yet connected): on this host's loopback,
        or through the remote libvirt host's SSH."""
        host = self.remote
        if host is None:
            return SSHSession(port, self.key_file, host_key)
        return SSHSession(port, self.key_file, host_key, sock_factory=lambda: host.tunnel(port), via=host.where)

    def _cmdlines(self, authkey: str) -> tuple[str, str]:
        """Xen's and dom0's command lines (dom0's carries the key SSH trusts)."""
        d0 = self.cfg.dom0
        xen_cmdline = (
            f"console=com1 com1=115200,8n1 dom0_mem={d0.memory}M,max:{d0.memory}M dom0_max_vcpus={d0.vcpus} "
            # Scrubbing all free RAM at boot costs seconds under TCG; a lab needs no scrub.
            "bootscrub=false loglvl=all guest_loglvl=all console_timestamps=boot "
            # `xl dmesg` keeps the boot log even after debug-key dumps (the default ring is 16 KiB).
            "conring_size=4M"
        )
        xen_cmdline = f"{xen_cmdline} {self.cfg.xen_args}".strip()
        # loglevel=4: every console byte is an emulated UART write under TCG;
        # the full kernel log stays available through dmesg in dom0.
        dom0_cmdline = f"root=/dev/vda rw console=hvc0 loglevel=4 xenlab.authkey={authkey} {d0.kernel_args}".strip()
        return xen_cmdline, dom0_cmdline

    def _emulator(self) -> str:
        return versions.qemu_binary(self.cfg.qemu)

    def domain_xml(self, boot: BootFiles, accel: str, port: int, uuid: str | None = None, placed: dict | None = None) -> str:
        """The libvirt domain; `placed`: the files' paths on a remote host (whose own QEMU runs it)."""
        pub = self.key_file.with_suffix(".pub").read_text().split()[1]
        xen_cmdline, dom0_cmdline = self._cmdlines(authkey=pub)
        where = placed or {"xen": boot.xen, "dom0_kernel": boot.dom0_kernel, "initramfs": boot.initramfs,
                           "disk": self.disk, "serial_log": self.serial_log}
        # QEMU's -initrd list: "file args,file"; a comma inside args is written ",,".
        modules_arg = f"{where['dom0_kernel']} {dom0_cmdline.replace(',', ',,')},{where['initramfs']}"
        return templates.render(
            "domain.xml.j2",
            domain_name=self.domain_name, lab_name=self.name, uuid=uuid, memory=self.cfg.memory, vcpus=self.cfg.vcpus,
            accel=accel, cpu=self.cfg.cpu, emulator="" if placed else self._emulator(),
            disk=where["disk"], serial_log=where["serial_log"], xen=where["xen"], xen_cmdline=xen_cmdline,
            modules_arg=modules_arg, ssh_port=port,
        )

    def _create(self, conn, xml: str, port: int):
        try:
            return conn.createXML(xml, 0)
        except virt.error_class() as e:
            self._remove_runtime_files()
            msg = str(e)
            hint = f"see {self.dir / 'domain.xml'}"
            if (remote := self.remote) and ("emulator" in msg or "capabilities" in msg):
                hint = f"the libvirt host {remote.where} has no QEMU for x86_64 guests: install qemu-system-x86 there"
            if "hostfwd" in msg or "Could not set up host forwarding" in msg:
                hint = f"port {port} was taken meanwhile; run `xenlab up` again"
            raise LabError(f"libvirt could not start the lab domain: {msg}", hint) from None

    def _wait_ready(self, dom, steps: Steps, boot_start: float, start_ssh: Callable[[], Future]) -> Future:
        """Follow the serial log until dom0 is ready; SSH starts once dom0's
        network is up, so its handshake overlaps the rest of the boot."""
        watch = serial.SerialWatch(self.serial_log)
        deadline = boot_start + self.cfg.boot_timeout
        ssh_ready: Future | None = None
        remote = self.remote  # not re-read from lab.json on every poll
        while True:
            if remote:
                self._mirror_serial(remote)
            new, crash, ready = watch.poll()
            for milestone in new:
                steps.note(f"{time.monotonic() - boot_start:5.1f} s  {milestone}")
            if ssh_ready is None and ("dom0 network" in watch.seen or ready):
                ssh_ready = start_ssh()
            if crash:
                raise BootError(
                    f"lab {self.name} crashed during boot: {crash}\n--- last lines of {self.serial_log} ---\n{watch.tail()}",
                    f"full serial log: {self.serial_log}",
                )
            if ready and ssh_ready is not None:  # started above, at the latest on this poll
                return ssh_ready
            if not virt.is_running(dom):
                raise BootError(
                    f"the lab VM stopped during boot\n--- last lines of {self.serial_log} ---\n{watch.tail()}",
                    f"full serial log: {self.serial_log}; QEMU's log: {self._qemu_log()}",
                )
            if time.monotonic() > deadline:
                raise BootError(
                    f"dom0 was not ready after {self.cfg.boot_timeout:.0f} s\n--- last lines of {self.serial_log} ---\n{watch.tail()}",
                    f"full serial log: {self.serial_log}; raise [lab] boot_timeout on a slow host",
                )
            time.sleep(0.1)

    def _start_ssh_check(self, image: images.Dom0Image, boot: BootFiles, port: int, cancel: threading.Event) -> Future:
        """Run the service check in a daemon thread: a failed boot sets `cancel`,
        and a process that exits does not wait for SSH retries."""
        future: Future = Future()

        def check() -> None:
            try:
                self._check_services(image, boot, port, cancel)
                future.set_result(None)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                future.set_exception(e)

        threading.Thread(target=check, name="ssh-ready", daemon=True).start()
        return future

    def _check_services(self, image: images.Dom0Image, boot: BootFiles, port: int, cancel: threading.Event) -> None:
        # The user's own files: what booted must be what they gave (one more round trip only then).
        own = boot.user_xen or boot.user_dom0_kernel
        with self._session(port, image.host_key).connect(timeout=self.cfg.boot_timeout, cancel=cancel) as ssh:
            found = set(ssh.check(READY_CHECK).split())
            booted = ssh.check("xl info | grep '^build_id'; uname -r").split() if own else []
        missing = REQUIRED_READY - found
        if missing:
            raise BootError(f"dom0 answers SSH but is missing: {', '.join(sorted(missing))}", f"see {self.serial_log}")
        if boot.user_xen and boot.xen_build_id and boot.xen_build_id not in booted:
            raise BootError(f"the Xen that booted is not {boot.user_xen}: build id {booted[2:3]} vs the file's {boot.xen_build_id}",
                            f"see {self.serial_log}")
        if boot.user_dom0_kernel and (not booted or booted[-1] != boot.dom0_release):
            raise BootError(f"dom0 runs kernel {booted[-1:] or '?'}, not {boot.user_dom0_kernel} ({boot.dom0_release})", f"see {self.serial_log}")

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

    def _remove_runtime_files(self) -> None:
        for path in (self.info_file, self.disk, self.boot_marker):
            path.unlink(missing_ok=True)

    def _end_stray_probes(self, started_after: float | None = None) -> None:
        """End QEMU capability probes that libvirt started for this lab's embed
        root and then lost: a xenlab process interrupted or killed while libvirt
        probed leaves the probe (daemonized, waiting on its QMP socket) for good.
        Probes older than STRAY_PROBE_AGE_S go, and with `started_after` (a
        time.time()) also those started since then."""
        for pidfile in self.embed_root.glob("lib/qemu/qmp-*/qmp.pid"):
            try:
                pid = int(pidfile.read_text().split()[0])
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (OSError, ValueError, IndexError):
                continue
            age = process_age(pid)
            # A live probe takes seconds; another process may be probing right now.
            ours = started_after is not None and time.time() - age >= started_after - 1
            if str(pidfile.parent).encode() in cmdline and (age > STRAY_PROBE_AGE_S or ours):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                shutil.rmtree(pidfile.parent, ignore_errors=True)

    def _stop_domain(self) -> tuple[bool, int | None]:
        """Destroy the lab's libvirt domain if there is one; (was it running, QEMU pid)."""
        self._end_stray_probes()
        pid = self._qemu_pid() or (self.info() or {}).get("qemu_pid")
        stopped = False
        if pid and self.qemu_alive():
            # The lab's state is thrown away anyway: SIGKILL ends QEMU at once,
            # where libvirt's SIGTERM-and-poll takes about 2 s under TCG.
            try:
                os.kill(pid, signal.SIGKILL)
                stopped = True
            except (ProcessLookupError, PermissionError):
                pass  # gone already, or another user's QEMU (a system daemon's): libvirt stops it
        if self.uri().startswith("qemu:///embed") and virt.drop_dead_record(self.embed_root, self.domain_name):
            stopped = True
        try:
            with self._connect(lock_wait=5 if stopped else 30) as conn:
                dom = virt.lookup(conn, self.domain_name)
                if dom is not None:
                    stopped = virt.is_running(dom) or stopped
                    virt.destroy(dom)
                self._remove_remote_files(conn)
        except LabError:
            # Another live process holds the lab's libvirt (docs/library.md):
            # its QEMU is killed already, and that process's libvirt sees it go.
            if not (stopped and self.uri().startswith("qemu:///embed")):
                raise
        if pid and pid_alive(pid):
            _wait_gone(pid, timeout=10)
        self._remove_runtime_files()
        return stopped, pid

    # -- down --------------------------------------------------------------
    def down(self, forget: bool = False) -> dict:
        """Stop the lab whatever its state; an `up` still booting it is interrupted first.
        `forget`: for a lab whose remote host is gone for good, drop only this
        host's record of it (what it left on that host stays there)."""
        if forget and not self.remote:
            raise ConfigError(f"--forget is for a lab on a remote libvirt host that is gone; lab {self.name!r} runs here",
                              f"`xenlab down --lab {self.name}` stops it")
        holder = self.lock_holder()
        if holder and holder[1] == "up" and pid_alive(holder[0]):
            # That `up` cleans up after itself when interrupted (destroys its domain).
            os.kill(holder[0], signal.SIGINT)
        with self.locked("down"):
            if forget:
                had = self.info() is not None
                self._remove_runtime_files()
                return {"name": self.name, "was_running": False, "qemu_pid": None, "forgotten": had}
            try:
                stopped, pid = self._stop_domain()
            except (LabError, virt.library().libvirtError) as e:
                if not (host := self.remote):
                    raise
                raise LabError(f"cannot stop lab {self.name!r} on its libvirt host {host.where}: {_reason(e)}",
                               f"its domain {self.domain_name} and volumes lab-{self.name}* may still be there: "
                               f"run `xenlab down --lab {self.name}` again when the host answers, "
                               f"or `xenlab down --lab {self.name} --forget` to drop only this machine's record of it") from None
            return {"name": self.name, "was_running": stopped, "qemu_pid": pid}

    def ensure_up(self, steps: Steps | None = None) -> bool:
        """Boot the lab unless it is up; True when this call booted it."""
        if self.state()[0] == "up":
            return False
        self.up(steps or Steps(quiet=True))
        self.booted = True
        return True

    # -- use ---------------------------------------------------------------
    def dom0(self) -> Dom0:
        """A Dom0 handle: run, check, put, get and XenStore (close it when done)."""
        from xenlab.lab.dom0 import Dom0

        return Dom0(self)

    def guests(self) -> Guests:
        """The Guests manager of this lab (create, list, exec, destroy; close it when done)."""
        from xenlab.guest.manager import Guests

        return Guests(self)

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

    def ssh(self, timeout: float = 15.0) -> SSHSession:
        info = self.require_up()
        image = images.Dom0Image(images.images_dir() / info["image_id"])
        return self._session(info["ssh_port"], image.host_key).connect(timeout=timeout)

    def openssh_argv(self, *command: str, tty: bool = False) -> list[str]:
        """OpenSSH to dom0 with the lab's key and pinned known_hosts (for interactive use)."""
        info = self.require_up()
        via = []
        if host := self.remote:  # through the libvirt host, as the lab's own sessions go
            hop = ["ssh", "-p", str(host.port), *(["-i", host.keyfile, "-o", "IdentitiesOnly=yes"] if host.keyfile else []),
                   *(["-o", f"UserKnownHostsFile={host.known_hosts}"] if host.known_hosts else []), "-W", "%h:%p", f"{host.user}@{host.host}"]
            via = ["-o", "ProxyCommand=" + " ".join(hop)]
        return [
            "ssh", *(["-t"] if tty else []), *via, "-i", str(self.key_file), "-p", str(info["ssh_port"]),
            "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes",
            "root@127.0.0.1", *command,
        ]

    def monitor(self, command: str) -> str:
        """A QEMU human-monitor command run in the lab's VM (through libvirt); its output."""
        self.require_up()
        with self.locked("QEMU monitor"), self._connect() as conn:
            dom = virt.lookup(conn, self.domain_name)
            if dom is None or not virt.is_running(dom):
                raise LabError(f"lab {self.name!r} has no running VM", f"start it with `xenlab up --lab {self.name}`")
            return virt.monitor(dom, command)

    def running(self) -> bool:
        with self.locked():
            return self._vm_running()

    def _vm_running(self) -> bool:
        with self._connect() as conn:
            dom = virt.lookup(conn, self.domain_name)
            return dom is not None and virt.is_running(dom)

    def status(self) -> dict:
        state, why = self.state()
        info = self.info()
        if state != "up" or info is None:
            return {"name": self.name, "state": state if info else "down", "hint": why}
        try:
            with self.ssh(timeout=5) as ssh:
                xl_info_text, xl_list_text, release = ssh.check("xl info; echo @@; xl list; echo @@; uname -r", timeout=30).split("@@\n")
        except SSHError as e:
            return {"name": self.name, "state": "unreachable", "hint": f"the VM runs but dom0 does not answer: {e.message}",
                    "ssh_port": info["ssh_port"], "serial_log": info["serial_log"]}
        xl_info, domains = parse_xl_info(xl_info_text), parse_xl_list(xl_list_text)
        dom0 = next((d for d in domains if d["id"] == 0), {})
        return {
            "name": self.name,
            "state": "up",
            "xen_version": f"{xl_info.get('xen_major')}.{xl_info.get('xen_minor')}{xl_info.get('xen_extra', '')}",
            "xen_build_id": xl_info.get("build_id"),
            "dom0_kernel_release": release.strip(),
            "boot": info.get("boot", {}),
            "versions": info.get("versions", {}),
            "xen_caps": xl_info.get("xen_caps"),
            "virt_caps": xl_info.get("virt_caps"),
            "host_memory_mib": int(xl_info.get("total_memory", 0)),
            "free_memory_mib": int(xl_info.get("free_memory", 0)),
            "dom0": {"memory_mib": dom0.get("memory_mib"), "vcpus": dom0.get("vcpus")},
            "domains": domains,
            "accel": info["accel"],
            "accel_reason": info["accel_reason"],
            "cpu": info.get("cpu"),
            "ssh_port": info["ssh_port"],
            "uri": info["uri"],
            "image_id": info["image_id"],
            "qemu_pid": info.get("qemu_pid"),
            "uptime_seconds": round(time.time() - info["started_at"], 1),
            "boot_seconds": info["boot_seconds"],
            "restored": info.get("restored", False),
            "snapshot": (info.get("snapshot") or {}).get("key"),
            "serial_log": info["serial_log"],
        }






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
    part = path.with_suffix(".part")
    part.write_text(json.dumps(data, indent=2))
    part.replace(path)


def _move(src: Path, dest: Path) -> None:
    try:
        os.replace(src, dest)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        shutil.copyfile(src, dest)  # the cache and the state directory on different filesystems
        src.unlink()


def _digest_async(snap: snapshots.Snapshot) -> Future:
    future: Future = Future()

    def work() -> None:
        try:
            future.set_result(snapshots.file_digest(snap.memory))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
            future.set_exception(e)

    threading.Thread(target=work, name="snapshot-digest", daemon=True).start()
    return future


STRAY_PROBE_AGE_S = 120


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
