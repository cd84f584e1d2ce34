"""Snapshots on the real lab: labs restored side by side from the session
lab's snapshot, `reset` in place, and a corrupt, truncated or stale
snapshot replaced by a cold boot with a one-line reason."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xenlab.lab import snapshot as snapshots
from xenlab.run import pid_alive

from .conftest import xenlab

pytestmark = pytest.mark.own_labs  # boots labs of its own: under xdist, beside the session lab's tests

SIDE = ("e2e-snap-a", "e2e-snap-b")


def up_json(*args: str) -> dict:
    return json.loads(xenlab("up", *args, "--json").stdout)


def ssh(lab: str, command: str, check: bool = True) -> subprocess.CompletedProcess:
    return xenlab("ssh", "--lab", lab, "--", command, check=check)


def assert_clock_is_the_hosts(lab: str) -> None:
    before = time.time()
    dom0_now = float(ssh(lab, "date +%s.%N").stdout)
    after = time.time()
    assert before - 1 <= dom0_now <= after + 1, (before, dom0_now, after)


@pytest.fixture(scope="module")
def side_by_side(lab_info):
    """Two more labs restored at once from the snapshot the session lab runs from."""
    for name in SIDE:
        xenlab("down", "--lab", name, check=False)
    procs = [subprocess.Popen([sys.executable, "-m", "xenlab", "up", "--lab", name, "--json"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for name in SIDE]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        yield [json.loads(out) for out, _ in outs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for name in SIDE:
            xenlab("down", "--lab", name, check=False)


@pytest.mark.gate
def test_labs_restore_side_by_side_from_one_snapshot(lab_info, side_by_side):
    key = lab_info["snapshot"]["key"]
    for info in side_by_side:
        assert info["restored"] and info["snapshot"]["key"] == key and not info["snapshot"]["saved_now"], info["snapshot"]
        assert pid_alive(info["qemu_pid"])
        # A restore is far shorter than the boot that made the snapshot.
        assert info["boot_seconds"] < info["snapshot"]["cold_boot_seconds"], info
    ports = {lab_info["ssh_port"]} | {info["ssh_port"] for info in side_by_side}
    assert len(ports) == 3
    # Each its own disk layer over the snapshot's frozen disk.
    ssh(SIDE[0], "echo only-in-a > /root/side-mark && sync")
    assert ssh(SIDE[0], "cat /root/side-mark").stdout == "only-in-a\n"
    assert ssh(SIDE[1], "test -e /root/side-mark", check=False).returncode == 1
    assert xenlab("ssh", "--lab", lab_info["name"], "--", "test -e /root/side-mark", check=False).returncode == 1
    for name in SIDE:
        assert_clock_is_the_hosts(name)
        assert "Domain-0" in ssh(name, "xl list").stdout
    snap = snapshots.find(key)
    assert set(snap.users()) >= {lab_info["name"], *SIDE}
    listed = json.loads(xenlab("snapshot", "ls", "--json").stdout)
    mine = next(s for s in listed if s["key"] == key)
    assert set(mine["used_by"]) >= set(SIDE) and mine["disk_bytes"] > 10 * 2**20 and mine["problem"] is None


@pytest.mark.gate
def test_reset_brings_back_the_state_after_boot(side_by_side):
    lab, before = SIDE[0], side_by_side[0]
    xenlab("guest", "create", "--lab", lab, "r1")
    ssh(lab, "touch /root/reset-mark && xenstore-write /local/domain/0/data/reset-mark 1")
    assert "r1" in ssh(lab, "xl list").stdout
    info = json.loads(xenlab("reset", "--lab", lab, "--json").stdout)
    assert info["restored"] and info["snapshot"]["key"] == before["snapshot"]["key"]
    assert info["ssh_port"] == before["ssh_port"]  # still free, so kept
    assert info["qemu_pid"] != before["qemu_pid"] and not pid_alive(before["qemu_pid"])
    assert ssh(lab, "test -e /root/reset-mark", check=False).returncode == 1
    assert ssh(lab, "xenstore-read /local/domain/0/data/reset-mark", check=False).returncode != 0
    assert [line.split()[0] for line in ssh(lab, "xl list").stdout.splitlines()[1:]] == ["Domain-0"]
    assert "r1" not in xenlab("guest", "list", "--lab", lab, "--json").stdout
    assert_clock_is_the_hosts(lab)
    # xenstored, xenconsoled and the toolstack work: a guest starts and answers on its console.
    xenlab("guest", "create", "--lab", lab, "r2")
    assert xenlab("guest", "exec", "--lab", lab, "r2", "echo", "after-reset").stdout == "after-reset\n"
    xenlab("guest", "destroy", "--lab", lab, "r2")
    status = json.loads(xenlab("status", "--lab", lab, "--json").stdout)
    assert status["state"] == "up"


# A configuration of its own (a snapshot key no other test uses), so breaking
# its snapshot costs nobody else a cold boot.
OWN = ("--lab", "e2e-snap-own", "--memory", "1792M")


def own_snapshot(info: dict) -> snapshots.Snapshot:
    snap = snapshots.find(info["snapshot"]["key"])
    assert snap is not None and snap.problem() is None
    return snap


@pytest.mark.full
def test_broken_snapshots_are_removed_and_the_lab_boots_cold(lab_info):
    xenlab("down", *OWN[:2], check=False)
    try:
        # --cold boots from scratch even when a good snapshot is there (one
        # is, after the first run on this host).
        booted = xenlab("up", *OWN, "--cold", "--json")
        assert "booting cold: --cold" in booted.stderr, booted.stderr
        first = json.loads(booted.stdout)
        xenlab("down", *OWN[:2])
        snap = own_snapshot(first)

        # A stale snapshot of another QEMU version: removed on sight, never loaded.
        stale = snap.path.with_name("0000stale0000000")
        shutil.copytree(snap.path, stale)
        manifest = json.loads((stale / "manifest.json").read_text())
        manifest["identity"]["qemu"] = "1.0.0"
        (stale / "manifest.json").write_text(json.dumps(manifest))

        # Flipped bytes inside the memory image: found by the digest, removed, cold boot.
        snap.memory.chmod(0o600)
        with open(snap.memory, "r+b") as f:
            f.seek(snap.memory.stat().st_size // 2)
            f.write(b"\xff" * 8)
        result = xenlab("up", *OWN)
        assert "removed snapshot 0000stale0000000 (QEMU version 1.0.0 -> " in result.stderr, result.stderr
        assert not stale.exists()
        # (8 bytes amid 150 MB are page contents but for a ~0.2 % chance of a
        # record header, which QEMU refuses to load: either way it is found.)
        assert (f"snapshot {snap.key} was removed: its memory file does not match its digest (corrupt)" in result.stderr
                or f"snapshot {snap.key} was removed: libvirt could not restore it" in result.stderr), result.stderr
        again = json.loads(xenlab("status", *OWN[:2], "--json").stdout)
        assert again["state"] == "up"
        info = json.loads(Path(lab_info["state_dir"]).with_name("e2e-snap-own").joinpath("lab.json").read_text())
        assert info["snapshot"]["saved_now"], info["snapshot"]  # booted cold and saved anew
        xenlab("down", *OWN[:2])

        # Truncated: named with both sizes, removed, cold boot.
        snap = own_snapshot(info)
        snap.memory.chmod(0o600)
        with open(snap.memory, "r+b") as f:
            f.truncate(snap.memory.stat().st_size // 3)
        result = xenlab("up", *OWN)
        assert f"snapshot {snap.key} was removed: its memory.save is" in result.stderr and "truncated" in result.stderr, result.stderr
        xenlab("down", *OWN[:2])
        # That boot saved a whole snapshot again: the next `up` restores it.
        assert up_json(*OWN)["restored"]
    finally:
        xenlab("down", *OWN[:2], check=False)


@pytest.mark.full
def test_a_full_disk_while_saving_leaves_no_usable_snapshot(tmp_path):
    """The snapshot directory on a 64 MiB filesystem: the save fails, the lab
    keeps running from its cold boot, and nothing usable is left."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
    name = ("--lab", "e2e-snap-full")
    env_cmd = [sys.executable, "-m", "xenlab", "up", *name, "--cold", "--json"]
    try:
        proc = subprocess.run(env_cmd, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "XENLAB_SNAPSHOTS": str(mount)})
        assert proc.returncode == 0, proc.stderr
        info = json.loads(proc.stdout)
        assert not info["restored"] and info["snapshot"] is None
        assert "no snapshot saved: " in proc.stderr, proc.stderr
        assert "No space left on device" in proc.stderr or "space" in proc.stderr.lower(), proc.stderr
        assert list(mount.iterdir()) == []  # not even a staging directory
        assert "Domain-0" in xenlab("ssh", *name, "--", "xl list").stdout
    finally:
        xenlab("down", *name, check=False)
        subprocess.run(["umount", str(mount)], check=False)
