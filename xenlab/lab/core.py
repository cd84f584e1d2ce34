"""The Lab: one Xen + dom0 VM under libvirt, with its state directory:
`up` (restore or cold boot), `reset`, `down`, `status` and the handles to
work in it. Its layers: state.py (files, lock, state), machine.py (the
libvirt domain), restore.py (snapshots)."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

from xenlab import config as config_mod
from xenlab.agent.xl import parse_xl_info, parse_xl_list
from xenlab.build import dom0 as images
from xenlab.build.boot import boot_files
from xenlab.errors import ConfigError, LabError, SSHError
from xenlab.lab import accel as accel_mod
from xenlab.lab import snapshot as snapshots
from xenlab.lab import virt
from xenlab.lab.machine import BootPlan
from xenlab.lab.restore import LabSnapshots
from xenlab.lab.snapshot import SnapshotError
from xenlab.lab.state import _read_json, _reason, _write_json, ports_lock
from xenlab.progress import Steps
from xenlab.run import pid_alive


class Lab(LabSnapshots):
    """One lab: Xen + dom0 in a libvirt domain, named by its config.

    `Lab.open("mylab")` reads the configuration (defaults, a TOML file,
    overrides); `ensure_up()` boots it unless it is up; `down()` stops it.
    The handles to work in it, dom0() and guests(), are xenlab.Lab's (api.py)."""

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
        plan = BootPlan(image, boot, choice, steps, started)
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
                        return self._restore(conn, snap, plan, port_hint)
                    except SnapshotError as e:
                        snap.remove()
                        reason = f"snapshot {snap.key} was removed: {e.message}"
                steps.note(f"booting cold: {reason}")
            else:
                why = ("--cold" if cold else "snapshots are off ([lab] snapshots = false)" if not self.cfg.snapshots
                       else f"snapshots need the embedded driver, not {self.uri().split('?')[0]}")
                steps.note(f"booting cold: {why}")
            return self._cold_boot(conn, plan, port_hint, identity if use_snapshots else None)

    def _cold_boot(self, conn, plan: BootPlan, port_hint: int, identity: dict | None) -> dict:
        image, boot, choice, steps = plan.image, plan.boot, plan.choice, plan.steps
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
        info = self._info(plan, port, boot_start, ready, snapshot=None)
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
            return self._cold_boot(conn, plan, port, None)
        try:
            return self._restore(conn, snap, plan, port, cold_boot_seconds=ready - boot_start)
        except SnapshotError as e:
            snap.remove()
            steps.note(f"the new snapshot {snap.key} did not restore ({e.message}); it was removed; booting cold again")
            return self._cold_boot(conn, plan, port, None)

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
            except (LabError, virt.error_class()) as e:
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

    def status(self) -> dict:
        state, why = self.state()
        info = self.info()
        if state != "up":
            return {"name": self.name, "state": state, "hint": why}
        if info is None:  # a `down` removed it since state() read it
            return {"name": self.name, "state": "down", "hint": "it was stopped just now"}
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
