"""The lab's VM: its libvirt domain (the XML, its start, where a remote
host keeps its files), the wait until dom0 is ready, and its teardown."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from xenlab import templates
from xenlab.build import dom0 as images
from xenlab.build.boot import BootFiles
from xenlab.errors import BootError, LabError
from xenlab.lab import accel as accel_mod
from xenlab.lab import serial, versions, virt
from xenlab.lab.remote import RemoteHost
from xenlab.lab.ssh import generate_key, known_hosts_line
from xenlab.lab.state import (
    READY_CHECK,
    REQUIRED_READY,
    LabState,
    _write_json,
    free_port,
    port_in_use,
    tail_lines,
)
from xenlab.progress import Steps
from xenlab.run import pid_alive, process_age, run

# Room a remote lab needs in the pool beyond its uploads: its disk overlay
# grows with what dom0 and its guests write, and the serial log.
REMOTE_DISK_HEADROOM = 256 << 20
# A capability probe of libvirt older than this is a stray whoever started it.
STRAY_PROBE_AGE_S = 120


@dataclass(frozen=True)
class BootPlan:
    """What one `up` or `reset` boots and how: the dom0 image, the files the
    VM boots, the accelerator, the progress steps and when the command began."""

    image: images.Dom0Image
    boot: BootFiles
    choice: accel_mod.AccelChoice
    steps: Steps
    started: float


class LabMachine(LabState):
    """The lab's libvirt domain: defined, started, watched until ready, stopped."""

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

    def _prepare(self, image: images.Dom0Image, port: int) -> None:
        generate_key(self.key_file)
        self.known_hosts.write_text(known_hosts_line(port, image.host_key))
        if self.serial_log.exists():
            self.serial_log.replace(self.dir / "serial.log.old")
        self.serial_log.touch()
        if not self.remote:
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", image.rootfs, self.disk])

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

    def _create(self, conn, xml: str, port: int):
        try:
            return virt.create(conn, xml)
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

    def _mark_started(self, uri: str, port: int) -> None:
        _write_json(self.boot_marker, {"pid": os.getpid(), "started_at": time.time(), "uri": uri,
                                       "ssh_port": port, "qemu_pid": self._qemu_pid(), "vm_started": True})

    def _info(self, plan: BootPlan, port: int, boot_start: float, ready: float, snapshot: dict | None) -> dict:
        """What lab.json records of this boot (and `up --json` prints)."""
        image, boot, choice = plan.image, plan.boot, plan.choice
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
            "up_seconds": round(ready - plan.started, 2),
            "restored": snapshot is not None,
            "snapshot": snapshot,
            "timings": plan.steps.timings,
            "serial_log": str(self.serial_log),
            **({"remote_serial_log": self._remote_serial} if self.remote else {}),
            "state_dir": str(self.dir),
            "config": self.cfg.to_dict(),
        }

    def _publish_info(self, info: dict) -> dict:
        _write_json(self.info_file, info)
        self.boot_marker.unlink(missing_ok=True)
        return info

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


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
