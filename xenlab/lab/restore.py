"""Snapshots of a booted lab: saved once after a cold boot, restored in
seconds instead of booting again (docs/snapshots.md)."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import threading
import time
from concurrent.futures import Future
from pathlib import Path

from xenlab.build.boot import BootFiles
from xenlab.errors import BootError, SSHError
from xenlab.lab import snapshot as snapshots
from xenlab.lab import versions, virt
from xenlab.lab.machine import BootPlan, LabMachine
from xenlab.lab.snapshot import SnapshotError
from xenlab.lab.ssh import SSHSession, known_hosts_line
from xenlab.lab.state import READY_CHECK, REQUIRED_READY, ports_lock
from xenlab.paths import TEMPLATES_DIR
from xenlab.progress import Steps
from xenlab.run import run

# A restored lab runs from the first instruction after the save: dom0 answers
# at once or something is wrong with the snapshot (then: a cold boot).
RESTORE_READY_SECONDS = 30.0


class LabSnapshots(LabMachine):
    """Save the ready lab as a snapshot, and run it again from one."""

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
                uuid = virt.uuid(dom)
                try:
                    virt.save(dom, stage / "memory.save")
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

    def _restore(self, conn, snap: snapshots.Snapshot, plan: BootPlan, port_hint: int, cold_boot_seconds: float | None = None) -> dict:
        """Run this lab from `snap`; SnapshotError (and nothing left running) when it cannot."""
        image, boot, choice, steps = plan.image, plan.boot, plan.choice, plan.steps
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
                    virt.restore(conn, source, xml)
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
        info = self._info(plan, port, restore_start, ready, snapshot=detail)
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


def _digest_async(snap: snapshots.Snapshot) -> Future:
    future: Future = Future()

    def work() -> None:
        try:
            future.set_result(snapshots.file_digest(snap.memory))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
            future.set_exception(e)

    threading.Thread(target=work, name="snapshot-digest", daemon=True).start()
    return future


def _move(src: Path, dest: Path) -> None:
    try:
        os.replace(src, dest)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        shutil.copyfile(src, dest)  # the cache and the state directory on different filesystems
        src.unlink()
