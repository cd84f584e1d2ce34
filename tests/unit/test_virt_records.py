"""virt.drop_dead_record on a stand-in embed root: the record a command killed
mid-restore leaves (a job in the status file) is dropped and its QEMU ended;
a record with no job, or a root a live driver holds, is left to libvirt."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from xenlab.lab import virt

NAME = "xenlab-unit"
LOCKER = "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.lockf(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"


@pytest.fixture
def stand_in_qemu():
    # A process whose command line names the domain as libvirt's QEMU does.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-name", f"guest={NAME},debug-threads=on"])
    yield proc
    proc.kill()
    proc.wait()


def make_root(tmp_path, pid: int, job: bool):
    run = tmp_path / "run" / "qemu"
    run.mkdir(parents=True)
    (run / "driver.pid").write_text("1\n")
    job_xml = "<job type='none' async='start' phase='none' asyncStarted='1'/>" if job else ""
    (run / f"{NAME}.xml").write_text(f"<domstatus state='paused' reason='starting up' pid='{pid}'>\n  {job_xml}\n  <domain/>\n</domstatus>\n")
    (run / f"{NAME}.pid").write_text(f"{pid}")
    private = tmp_path / "lib" / "qemu" / f"domain-3-{NAME}"
    private.mkdir(parents=True)
    (private / "monitor.sock").write_text("")
    return run, private


def gone(proc) -> bool:
    deadline = time.monotonic() + 5
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc.poll() is not None


def test_a_recorded_job_is_dropped_and_its_qemu_ended(tmp_path, stand_in_qemu):
    run, private = make_root(tmp_path, stand_in_qemu.pid, job=True)
    assert virt.drop_dead_record(tmp_path, NAME) == stand_in_qemu.pid
    assert gone(stand_in_qemu)
    assert not (run / f"{NAME}.xml").exists() and not (run / f"{NAME}.pid").exists() and not private.exists()


def test_a_dead_qemu_is_not_signalled_but_its_record_goes(tmp_path, stand_in_qemu):
    stand_in_qemu.kill()
    stand_in_qemu.wait()
    run, _ = make_root(tmp_path, stand_in_qemu.pid, job=True)
    assert virt.drop_dead_record(tmp_path, NAME) is None
    assert not (run / f"{NAME}.xml").exists()


def test_another_process_is_never_signalled(tmp_path):
    # A live pid whose command line does not name the domain (a reused pid).
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run, _ = make_root(tmp_path, other.pid, job=True)
        virt.drop_dead_record(tmp_path, NAME)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_a_record_without_a_job_is_left_to_libvirt(tmp_path, stand_in_qemu):
    run, private = make_root(tmp_path, stand_in_qemu.pid, job=False)
    assert virt.drop_dead_record(tmp_path, NAME) is None
    assert stand_in_qemu.poll() is None and (run / f"{NAME}.xml").exists() and private.exists()


def test_a_root_a_live_driver_holds_is_left_to_it(tmp_path, stand_in_qemu):
    run, _ = make_root(tmp_path, stand_in_qemu.pid, job=True)
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(run / "driver.pid")], stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline().strip() == "held"
        assert virt.drop_dead_record(tmp_path, NAME) is None
        assert stand_in_qemu.poll() is None and (run / f"{NAME}.xml").exists()
    finally:
        locker.kill()
        locker.wait()
