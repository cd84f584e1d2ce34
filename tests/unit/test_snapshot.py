"""Snapshot cache logic: what makes a snapshot usable, what removes it.
(Restoring one is tested on the real lab in tests/e2e/test_snapshot.py.)"""

import json

import pytest

from xenlab.errors import LabError
from xenlab.lab import snapshot as snapshots
from xenlab.lab import versions

IDENTITY = {"format": snapshots.SNAPSHOT_FORMAT, "image_id": "dom0-a", "memory": 2048, "qemu": "7.2.19"}


@pytest.fixture(autouse=True)
def own_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("XENLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("XENLAB_STATE", str(tmp_path / "state"))


def make(lab="one", identity=IDENTITY, memory=b"m" * 1000, disk=b"d" * 100):
    key = snapshots.key_of({**identity, "lab": lab})
    stage = snapshots.staging(key)
    (stage / "memory.save").write_bytes(memory)
    (stage / "disk.qcow2").write_bytes(disk)
    return snapshots.publish(stage, key, lab, identity, {"uuid": "u"})


def test_published_snapshot_is_whole_and_read_only():
    snap = make()
    assert snap.problem() is None
    assert snap.manifest["sizes"] == {"memory.save": 1000, "disk.qcow2": 100}
    assert snap.manifest["memory_sha256"] == snapshots.file_digest(snap.memory)
    assert not list(snapshots.snapshots_dir().glob(".*"))  # no staging left
    assert oct(snap.disk.stat().st_mode & 0o777) == "0o400"


def test_truncated_memory_file_is_named():
    snap = make()
    snap.memory.chmod(0o600)
    with open(snap.memory, "r+b") as f:
        f.truncate(10)
    assert "memory.save is 10 bytes, not the 1000" in snap.problem()


def test_missing_manifest_means_interrupted_save():
    snap = make()
    (snap.path / "manifest.json").unlink()
    assert "interrupted save" in snap.problem()


def test_other_format_is_refused():
    snap = make(identity={**IDENTITY, "format": 0})
    assert "another version of xenlab" in snap.problem()


def test_differences_name_what_changed():
    assert snapshots.differences(IDENTITY, {**IDENTITY, "memory": 3072}) == ["lab memory 2048 -> 3072"]
    changed = snapshots.differences(IDENTITY, {**IDENTITY, "image_id": "dom0-b", "qemu": "8.2.0"})
    assert changed == ["dom0 image dom0-a -> dom0-b", "QEMU version 7.2.19 -> 8.2.0"]


def test_publishing_prunes_the_labs_older_unused_snapshots():
    old = make(identity={**IDENTITY, "memory": 1024})
    other_lab = make(lab="two", identity={**IDENTITY, "memory": 1024})
    new = make()
    assert not old.path.exists()
    assert new.path.exists() and other_lab.path.exists()


def test_a_snapshot_a_lab_runs_from_is_kept(tmp_path):
    old = make(identity={**IDENTITY, "memory": 1024})
    lab = tmp_path / "state" / "labs" / "runner"
    lab.mkdir(parents=True)
    (lab / "lab.json").write_text(json.dumps({"snapshot": {"key": old.key}}))
    assert old.users() == ["runner"]
    make()
    assert old.path.exists()
    assert snapshots.prune() == []


def test_prune_removes_interrupted_saves():
    make()
    dead = snapshots.snapshots_dir() / ".abc.part.999999999"
    dead.mkdir()
    snapshots.prune()
    assert not dead.exists()


def test_remove_unknown_key_removes_nothing():
    snap = make()
    with pytest.raises(LabError, match="no snapshot nope"):
        snapshots.remove([snap.key, "nope"])
    assert snap.path.exists()
    assert snapshots.remove([snap.key]) == [snap.key]
    assert snapshots.all_snapshots() == []


def test_only_a_snapshot_no_qemu_here_can_load_is_outdated(tmp_path):
    # Two QEMU stacks side by side (stock and backports) each keep their own
    # snapshots: a lab on one must not remove the other's.
    def emulator(name, version):
        path = tmp_path / name
        path.write_text(f"#!/bin/sh\necho 'QEMU emulator version {version} (Debian)'\n")
        path.chmod(0o755)
        return str(path)

    versions.qemu_version.cache_clear()
    stock, backports = emulator("stock", "7.2.22"), emulator("backports", "10.0.2")
    of_stock = {**IDENTITY, "emulator": stock, "qemu": "7.2.22", "libvirt": "9.0.0"}
    of_backports = {**IDENTITY, "emulator": backports, "qemu": "10.0.2", "libvirt": "9.0.0"}
    assert not snapshots.can_never_load(of_stock, "9.0.0")
    assert not snapshots.can_never_load(of_backports, "9.0.0")
    assert snapshots.can_never_load({**of_stock, "qemu": "7.2.19"}, "9.0.0")  # that QEMU was upgraded since
    assert snapshots.can_never_load({**of_stock, "emulator": str(tmp_path / "gone")}, "9.0.0")
    assert snapshots.can_never_load(of_stock, "9.1.0")  # libvirt upgraded
    assert snapshots.can_never_load({**of_stock, "format": 0}, "9.0.0")
    versions.qemu_version.cache_clear()
