"""`--connect qemu:///system`: the same lab booted through a libvirt daemon
instead of the embedded driver. Uses a running system libvirtd, or starts
one (and a qemu.conf that lets QEMU read images under root's home) and
removes both afterwards."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from xenlab.run import pid_alive

from .conftest import IN_CI, xenlab

pytestmark = [pytest.mark.full, pytest.mark.own_labs]  # boots labs of its own: under xdist, beside the session lab's tests

LAB = "e2e-sys"
LIBVIRTD = "/usr/sbin/libvirtd"
CONF_DIR = Path("/etc/libvirt")
# The images live under ~/.cache of root, which the default libvirt-qemu user cannot read.
QEMU_CONF = 'user = "root"\ngroup = "root"\ndynamic_ownership = 0\nstdio_handler = "file"\n'
SOCKET = Path("/run/libvirt/libvirt-sock")


def _daemon_answers() -> bool:
    import libvirt

    try:
        libvirt.open("qemu:///system").close()
        return True
    except libvirt.libvirtError:
        return False


@pytest.fixture(scope="module")
def system_libvirtd(lab_info):
    if not Path(LIBVIRTD).exists():
        message = f"{LIBVIRTD} is missing (package libvirt-daemon; ci/setup-host.sh installs it)"
        pytest.fail(message) if IN_CI else pytest.skip(message)
    if SOCKET.exists() and _daemon_answers():
        yield None  # someone else's daemon: used as it is
        return
    made_dir = not CONF_DIR.exists()
    conf = CONF_DIR / "qemu.conf"
    made_conf = not conf.exists()
    if made_conf:
        CONF_DIR.mkdir(parents=True, exist_ok=True)
        conf.write_text(QEMU_CONF)
    pid_file = Path("/run/xenlab-e2e-libvirtd.pid")
    log = open(Path(lab_info["state_dir"]).parent / "e2e-libvirtd.log", "w")
    proc = subprocess.Popen([LIBVIRTD, "--pid-file", str(pid_file)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not (SOCKET.exists() and _daemon_answers()):
            assert proc.poll() is None, f"libvirtd exited with {proc.returncode}; see {log.name}"
            assert time.monotonic() < deadline, f"libvirtd did not answer within 30 s; see {log.name}"
            time.sleep(0.2)
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if made_conf:
            conf.unlink(missing_ok=True)
        if made_dir:
            shutil.rmtree(CONF_DIR, ignore_errors=True)


def test_lab_through_system_daemon(system_libvirtd):
    xenlab("down", "--name", LAB, check=False)
    info = json.loads(xenlab("up", "--name", LAB, "--connect", "qemu:///system", "--json").stdout)
    try:
        assert info["uri"] == "qemu:///system" and info["qemu_pid"] and pid_alive(info["qemu_pid"])
        status = json.loads(xenlab("status", "--name", LAB, "--json").stdout)
        assert status["state"] == "up" and status["uri"] == "qemu:///system" and status["xen_version"].startswith("4.17")
        assert "xen_version            : 4.17" in xenlab("ssh", "--name", LAB, "--", "xl info").stdout
        # The daemon's QEMU, not the embedded driver's.
        assert Path(f"/run/libvirt/qemu/xenlab-{LAB}.pid").read_text().strip() == str(info["qemu_pid"])
    finally:
        down = json.loads(xenlab("down", "--name", LAB, "--json").stdout)
    assert down["was_running"] is True and not pid_alive(info["qemu_pid"])
    import libvirt

    conn = libvirt.open("qemu:///system")
    try:
        assert f"xenlab-{LAB}" not in [d.name() for d in conn.listAllDomains()]
    finally:
        conn.close()
