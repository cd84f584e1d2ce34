"""Interrupted and dead labs on the real lab: `up` killed with SIGKILL while
booting leaves an orphaned VM that status names at once and the next `up`
recovers; a lab whose QEMU died is reported gone at once (no SSH wait) and
`up` boots it again; `down` works in every state. Each test uses a lab of its
own, so the shared e2e lab is not disturbed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from xenlab.run import pid_alive

from .conftest import lab_prerequisites, xenlab

pytestmark = [pytest.mark.full, pytest.mark.own_labs]  # boots labs of its own: under xdist, beside the session lab's tests

LAB = "e2e-recover"


def status() -> dict:
    return json.loads(xenlab("status", "--lab", LAB, "--json").stdout)


def wait_for(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} within {seconds:.0f} s")


def test_up_killed_while_booting_leaves_an_orphan_the_next_up_recovers():
    lab_prerequisites()
    xenlab("down", "--lab", LAB)
    # --cold: a restore is ready too soon after its VM starts to be caught booting.
    up = subprocess.Popen([sys.executable, "-m", "xenlab", "up", "--lab", LAB, "--cold"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        marker = os.path.expanduser(f"~/.local/state/xenlab/labs/{LAB}/booting.json")
        assert status()["state"] in ("booting", "down")
        wait_for(lambda: os.path.exists(marker) and json.load(open(marker)).get("vm_started"), 120, "the VM did not start")
        assert status()["state"] == "booting"
        qemu = json.load(open(marker))["qemu_pid"]
        up.kill()  # SIGKILL: no cleanup at all
        up.wait()
        t = time.monotonic()
        st = status()
        assert st["state"] == "orphaned" and time.monotonic() - t < 5 and pid_alive(qemu), st
        guests = xenlab("guest", "list", "--lab", LAB, check=False)
        assert guests.returncode == 1 and "orphaned" in guests.stderr
        again = json.loads(xenlab("up", "--lab", LAB, "--json").stdout)
        assert not pid_alive(qemu) and pid_alive(again["qemu_pid"]) and status()["state"] == "up"
    finally:
        if up.poll() is None:
            up.kill()
        down = json.loads(xenlab("down", "--lab", LAB, "--json").stdout)
    assert not down["qemu_pid"] or not pid_alive(down["qemu_pid"])
    assert status()["state"] == "down"


def test_a_dead_vm_is_gone_at_once_and_up_boots_it_again():
    lab_prerequisites()
    xenlab("down", "--lab", LAB)
    info = json.loads(xenlab("up", "--lab", LAB, "--json").stdout)
    try:
        os.kill(info["qemu_pid"], signal.SIGKILL)  # the QEMU this test started
        wait_for(lambda: not pid_alive(info["qemu_pid"]), 30, "QEMU did not exit")
        t = time.monotonic()
        st = status()
        assert st["state"] == "gone" and time.monotonic() - t < 5, st
        ssh = xenlab("ssh", "--lab", LAB, "--", "true", check=False)
        assert ssh.returncode == 1 and "gone" in ssh.stderr and time.monotonic() - t < 15
        again = json.loads(xenlab("up", "--lab", LAB, "--json").stdout)
        assert status()["state"] == "up" and again["qemu_pid"] != info["qemu_pid"]
    finally:
        xenlab("down", "--lab", LAB)
    assert status()["state"] == "down"
