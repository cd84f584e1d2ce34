"""Snapshots of a booted lab, kept in the cache like images.

A snapshot is taken once a cold boot reaches ready: libvirt saves the VM
(QEMU's migration stream to a file: memory and device state) and dom0's
copy-on-write disk layer as it was at that instant becomes the snapshot's
frozen disk. A restore gives each lab a fresh layer over that disk, so any
number of labs restore side by side from one snapshot, each with its own
disk writes, name and SSH port.

A snapshot is used only by a lab whose boot would be identical: the same
dom0 image and boot files, Xen and dom0 command lines, memory, vCPUs, CPU
model, accelerator, and the same QEMU and libvirt (a migration stream from
another QEMU may load wrongly rather than fail). The key is a digest of all
that; a lab boots cold and says which of them changed otherwise.

Layout: <cache>/snapshots/<key>/ manifest.json (written last: a directory
without it is never used), memory.save, disk.qcow2, id_ed25519(.pub) (dom0
of the snapshot trusts that key: it came on the boot command line) and
serial.log (the cold boot's console, prepended to a restored lab's log)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from xenlab.errors import LabError
from xenlab.lab import versions
from xenlab.paths import cache_dir, state_root
from xenlab.run import pid_alive

SNAPSHOT_FORMAT = 1  # bump when what a snapshot holds changes shape
# libvirt's save image (qemu_saveimage.h): magic, then version, XML length,
# was_running, compressed, cookie offset (uint32 each), 14 unused uint32s.
SAVE_MAGIC = b"LibvirtQemudSave"
SAVE_HEADER_SIZE = 16 + 4 * 5 + 4 * 14
MANIFEST = "manifest.json"

# Named in the reason a lab boots cold, in this order.
IDENTITY_LABELS = {
    "image_id": "dom0 image",
    "boot": "Xen or dom0 kernel files",
    "xen_cmdline": "Xen command line",
    "dom0_cmdline": "dom0 command line",
    "memory": "lab memory",
    "vcpus": "lab vCPUs",
    "cpu": "CPU model",
    "accel": "accelerator",
    "qemu": "QEMU version",
    "libvirt": "libvirt version",
    "emulator": "QEMU binary",
    "format": "snapshot format",
}


class SnapshotError(LabError):
    """A snapshot that cannot be used: the lab boots cold instead."""


def snapshots_dir() -> Path:
    """<cache>/snapshots, or $XENLAB_SNAPSHOTS (e.g. a faster or larger disk)."""
    override = os.environ.get("XENLAB_SNAPSHOTS")
    return Path(override) if override else cache_dir() / "snapshots"


def key_of(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def differences(old: dict, new: dict) -> list[str]:
    """What changed between two identities, as words for a user."""
    out = []
    for field, label in IDENTITY_LABELS.items():
        if old.get(field) != new.get(field):
            before, after = old.get(field), new.get(field)
            short = all(isinstance(v, (int, str)) and len(str(v)) <= 24 for v in (before, after))
            out.append(f"{label} {before} -> {after}" if short else f"{label} changed")
    return out


def can_never_load(identity: dict, libvirt: str) -> bool:
    """Whether a snapshot with this identity can never be restored on this host
    again: written by another snapshot format or libvirt, or its QEMU binary is
    gone or now another version. A snapshot of the other installed QEMU (stock
    beside backports) is not: labs on that QEMU still restore it."""
    if identity.get("format") != SNAPSHOT_FORMAT or identity.get("libvirt") != libvirt:
        return True
    emulator = identity.get("emulator")
    return not emulator or versions.qemu_version(emulator) != identity.get("qemu")


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass
class Snapshot:
    path: Path

    key = property(lambda self: self.path.name)
    memory = property(lambda self: self.path / "memory.save")
    disk = property(lambda self: self.path / "disk.qcow2")
    key_file = property(lambda self: self.path / "id_ed25519")
    serial_log = property(lambda self: self.path / "serial.log")

    @property
    def manifest(self) -> dict:
        try:
            return json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError):
            return {}

    def renamed_copy(self, dest: Path, name: str) -> str:
        """Copy memory.save to `dest` with the domain in its stored XML renamed
        to `name` (libvirt restores a save only under the name it was saved
        with; the labs restoring side by side each have their own), checking
        the digest on the way. Returns the digest of the original."""
        old = self.manifest.get("domain", "")
        digest = hashlib.sha256()
        with open(self.memory, "rb") as src, open(dest, "wb") as out:
            header = src.read(SAVE_HEADER_SIZE)
            if len(header) != SAVE_HEADER_SIZE or header[:16] != SAVE_MAGIC:
                raise SnapshotError("its memory file does not start with libvirt's save header")
            version, data_len, was_running, compressed, cookie_at = struct.unpack("<5I", header[16:36])
            data = src.read(data_len)
            digest.update(header)
            digest.update(data)
            xml = data[:cookie_at or data.index(b"\0")].rstrip(b"\0")
            cookie = data[cookie_at:].split(b"\0", 1)[0] if cookie_at else b""
            new_xml = xml.replace(f"<name>{old}</name>".encode(), f"<name>{name}</name>".encode(), 1) + b"\0"
            new_data = new_xml + cookie + b"\0"
            if not old or new_xml == xml + b"\0" or len(new_data) > data_len:
                raise SnapshotError(f"cannot rename domain {old!r} in its memory file")
            out.write(header[:16] + struct.pack("<5I", version, data_len, was_running, compressed, len(new_xml) if cookie_at else 0)
                      + header[36:])
            out.write(new_data.ljust(data_len, b"\0"))
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        return digest.hexdigest()

    def problem(self) -> str | None:
        """Why this snapshot cannot be used as it is on disk (None: it looks whole).
        Checks what is cheap; the memory file's digest is checked during a restore."""
        manifest = self.manifest
        if not manifest:
            return "its manifest is missing or unreadable (an interrupted save)"
        if manifest.get("identity", {}).get("format") != SNAPSHOT_FORMAT:
            return "it was written by another version of xenlab"
        for name, size in manifest.get("sizes", {}).items():
            try:
                actual = (self.path / name).stat().st_size
            except OSError:
                return f"its {name} is missing"
            if actual != size:
                return f"its {name} is {actual} bytes, not the {size} it was saved with (truncated or overwritten)"
        return None

    def users(self) -> list[str]:
        """Labs whose disk layer sits on this snapshot's disk (from their lab.json)."""
        found = []
        for info_file in sorted(state_root().glob("*/lab.json")):
            try:
                info = json.loads(info_file.read_text())
            except (OSError, ValueError):
                continue
            if (info.get("snapshot") or {}).get("key") == self.key:
                found.append(info_file.parent.name)
        return found

    def disk_use(self) -> int:
        """Bytes the snapshot's files take on disk (sparse files count what is allocated)."""
        return sum(p.stat().st_blocks * 512 for p in self.path.iterdir() if p.is_file())

    def remove(self) -> None:
        # Out of sight first (a concurrent `up` never finds half of it), then deleted.
        doomed = self.path.with_name(f".{self.key}.removing.{os.getpid()}")
        try:
            self.path.rename(doomed)
        except FileNotFoundError:
            return
        shutil.rmtree(doomed, ignore_errors=True)

    def describe(self) -> dict:
        manifest = self.manifest
        identity = manifest.get("identity", {})
        return {
            "key": self.key,
            "lab": manifest.get("lab"),
            "created_at": manifest.get("created_at"),
            "image_id": identity.get("image_id"),
            "memory_mib": identity.get("memory"),
            "qemu": identity.get("qemu"),
            "libvirt": identity.get("libvirt"),
            "disk_bytes": self.disk_use(),
            "problem": self.problem(),
            "used_by": self.users(),
            "path": str(self.path),
        }


def find(key: str) -> Snapshot | None:
    snap = Snapshot(snapshots_dir() / key)
    return snap if snap.path.is_dir() else None


def all_snapshots() -> list[Snapshot]:
    root = snapshots_dir()
    if not root.is_dir():
        return []
    return sorted((Snapshot(p) for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda s: s.manifest.get("created_at", 0))


def staging(key: str) -> Path:
    """A private directory to fill a new snapshot in; `publish` renames it into place."""
    root = snapshots_dir()
    root.mkdir(parents=True, exist_ok=True)
    stage = root / f".{key}.part.{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(mode=0o700)
    return stage


def publish(stage: Path, key: str, lab: str, identity: dict, extra: dict) -> Snapshot:
    """Seal a filled staging directory: digest, sizes, then the manifest last
    (written and synced before the rename, so a full disk or a crash leaves
    no directory that looks usable)."""
    names = ("memory.save", "disk.qcow2")
    manifest = {
        "lab": lab,
        "created_at": time.time(),
        "identity": identity,
        "sizes": {n: (stage / n).stat().st_size for n in names},
        "memory_sha256": file_digest(stage / "memory.save"),
        **extra,
    }
    for n in names:
        (stage / n).chmod(0o400)  # the frozen base of every restored lab's disk
    part = stage / (MANIFEST + ".part")
    with open(part, "w") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    part.replace(stage / MANIFEST)
    final = snapshots_dir() / key
    if final.exists() and Snapshot(final).problem() is None:
        # A lab racing us saved the same state, and labs may already run on
        # its disk layer: keep it, drop ours.
        shutil.rmtree(stage, ignore_errors=True)
        return Snapshot(final)
    if final.exists():
        Snapshot(final).remove()
    stage.rename(final)
    prune(lab)  # this lab's older snapshots, unless a lab runs from them
    return Snapshot(final)


def describe_all() -> list[dict]:
    return [snap.describe() for snap in all_snapshots()]


def remove(keys: list[str], every: bool = False) -> list[str]:
    """Remove the snapshots named (or all with `every`); an unknown key is an error, before anything is removed."""
    known = {snap.key: snap for snap in all_snapshots()}
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise LabError(f"no snapshot {', '.join(unknown)}", "`xenlab snapshot ls` lists them")
    if not keys and not every:
        raise LabError("name the snapshots to remove, or give --all", "`xenlab snapshot ls` lists them")
    doomed = list(known) if every else keys
    for key in doomed:
        known[key].remove()  # a lab running from it keeps its open files until it stops
    return doomed


def prune(lab: str | None = None) -> list[str]:
    """Keep the newest snapshot each lab saved and every one a lab runs
    from; remove the rest (only `lab`'s when given) and leftovers of
    interrupted saves. Returns the keys removed."""
    root = snapshots_dir()
    if root.is_dir():
        for leftover in root.glob(".*"):
            pid = leftover.name.rsplit(".", 1)[-1]
            if not (pid.isdigit() and pid_alive(int(pid))):
                shutil.rmtree(leftover, ignore_errors=True)
    newest: dict[str | None, str] = {}
    every = all_snapshots()  # oldest first
    for snap in every:
        newest[snap.manifest.get("lab")] = snap.key
    removed = []
    for snap in every:
        owner = snap.manifest.get("lab")
        if (lab is None or owner == lab) and newest.get(owner) != snap.key and not snap.users():
            snap.remove()
            removed.append(snap.key)
    return removed


