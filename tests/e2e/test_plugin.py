"""The pytest plugin against the real lab, through pytester: an inner pytest
session (its own process, the plugin loaded from its entry point) reuses the
shared e2e lab by name and leaves it running. A passing test, a failing test
whose artifacts appear and are named in the report, and destructive tests
that each get their own domU, gone afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from xenlab.agent.facts import GUESTS_DIR

from .conftest import LAB

pytestmark = pytest.mark.own_labs  # boots labs of its own: under xdist, beside the session lab's tests

pytest_plugins = ["pytester"]
# pytester points HOME at its temporary directory; the inner session must
# find the lab's state (~/.local/state/xenlab) and image cache where they are.
REAL_HOME = os.environ.get("HOME") or str(Path.home())

INNER = '''
import json
from pathlib import Path

import pytest

SEEN = Path(__file__).with_name("seen.json")


def remember(key, value):
    seen = json.loads(SEEN.read_text()) if SEEN.exists() else {}
    seen[key] = value
    SEEN.write_text(json.dumps(seen))


@pytest.mark.xenlab
def test_dom0_commands_files_and_xenstore(xenlab_lab, xenlab_dom0):
    assert "xen_version" in xenlab_dom0.check("xl info")
    assert xenlab_dom0.run("exit 7").exit_status == 7
    xenlab_dom0.put(b"plugin bytes", "/tmp/plugin-put")
    assert xenlab_dom0.get("/tmp/plugin-put") == b"plugin bytes"
    assert xenlab_dom0.xs.read("/local/domain/0/name") == "Domain-0"
    remember("lab", {"name": xenlab_lab.name, "booted": xenlab_lab.booted})


def test_failing_leaves_artifacts(xenlab_dom0, xenlab_guest_factory):
    guest = xenlab_guest_factory("pt-failing")
    remember("failing_guest", {"name": guest.name, "domid": guest.domid})
    xenlab_dom0.xs.write("/local/domain/0/data/plugin-marker", "set-by-the-failing-test")
    guest.exec("echo console-marker-from-the-failing-test > /dev/hvc0")
    assert xenlab_dom0.run("false").ok, "this test fails on purpose"


@pytest.mark.parametrize("n", [1, 2])
def test_destructive_gets_its_own_domu(xenlab_guest_factory, xenlab_dom0, n):
    guest = xenlab_guest_factory(disks=["8M"], memory="64M")
    remember(f"destructive_{n}", {"name": guest.name, "domid": guest.domid})
    assert f" {guest.domid} " in xenlab_dom0.check("xl list")
    # Destructive: wipe the guest's disk from inside; nobody else uses this domU.
    result = guest.exec("dd if=/dev/zero of=/dev/xvda bs=64k count=16 2>&1 && echo wiped")
    assert result.ok and "wiped" in result.stdout, result
'''


@pytest.mark.full
def test_plugin_on_the_real_lab(lab_info, pytester, dom0, monkeypatch):
    monkeypatch.setenv("HOME", REAL_HOME)
    pytester.makepyfile(test_driver=INNER)
    junit = pytester.path / "inner.xml"
    result = pytester.runpytest_subprocess(
        "--xenlab-name", lab_info["name"], "--xenlab-keep", "-p", "no:cacheprovider", f"--junitxml={junit}", "-rA", timeout=1200,
    )
    out = result.stdout.str()
    result.assert_outcomes(passed=3, failed=1)
    seen = json.loads((pytester.path / "seen.json").read_text())

    # The inner session reused the running e2e lab and left it up.
    assert seen["lab"] == {"name": LAB, "booted": False}
    assert "Domain-0" in dom0("xl list").stdout

    # The failing test: artifacts in a per-test folder, named in the report and in JUnit.
    folder = pytester.path / "xenlab-artifacts" / "test_driver.py_test_failing_leaves_artifacts"
    assert f"saved in {folder}" in out, out
    names = {p.name for p in folder.iterdir()}
    assert {"serial.log", "xl-dmesg.txt", "xl-list.txt", "dom0-dmesg.txt", "xenstore.txt", "console-pt-failing.log"} <= names, names
    assert "Xen version 4.17" in (folder / "serial.log").read_text(errors="replace")
    assert "Xen version 4.17" in (folder / "xl-dmesg.txt").read_text()
    assert "/local/domain/0/data/plugin-marker = \"set-by-the-failing-test\"" in (folder / "xenstore.txt").read_text()
    assert "console-marker-from-the-failing-test" in (folder / "console-pt-failing.log").read_text(errors="replace")
    assert "pt-failing" in (folder / "xl-list.txt").read_text()
    props = {p.get("name"): p.get("value") for p in ET.parse(junit).getroot().iter("property")}
    assert props.get("xenlab_artifacts") == str(folder)
    # Only the failing test got a folder.
    assert [p.name for p in (pytester.path / "xenlab-artifacts").iterdir()] == [folder.name]

    # Destructive tests: each its own domU, all destroyed afterwards (the failing test's too).
    guests = [seen["destructive_1"], seen["destructive_2"], seen["failing_guest"]]
    assert len({g["name"] for g in guests}) == 3 and len({g["domid"] for g in guests}) == 3
    xl_list = dom0("xl list").stdout
    left = dom0(f"ls {GUESTS_DIR}/ 2>/dev/null || true").stdout.split()
    for g in guests:
        assert g["name"] not in xl_list and g["name"] not in left, (g, xl_list, left)
    dom0("xenstore-rm /local/domain/0/data/plugin-marker", check=False)


RESET_FIRST = '''
import json
from pathlib import Path


def test_leaves_marks(xenlab_lab, xenlab_dom0, xenlab_guest_factory):
    xenlab_guest_factory("pt-reset-left")
    xenlab_dom0.check("touch /root/reset-mark")
    Path(__file__).with_name("first.json").write_text(json.dumps({"booted": xenlab_lab.booted, "qemu": xenlab_lab.info()["qemu_pid"]}))
'''

RESET_SECOND = '''
import json
from pathlib import Path


def test_sees_the_lab_as_after_boot(xenlab_lab, xenlab_dom0):
    assert xenlab_dom0.run("test -e /root/reset-mark").exit_status == 1
    domains = [line.split()[0] for line in xenlab_dom0.check("xl list").splitlines()[1:]]
    Path(__file__).with_name("second.json").write_text(json.dumps({"domains": domains, "qemu": xenlab_lab.info()["qemu_pid"],
                                                                    "restored": xenlab_lab.info()["restored"]}))
'''


@pytest.mark.full
def test_reset_per_module_gives_each_module_a_fresh_lab(lab_info, pytester, monkeypatch):
    """--xenlab-reset module on a lab of its own (restored from the session
    lab's snapshot): the second module finds no trace of the first."""
    monkeypatch.setenv("HOME", REAL_HOME)
    name = "e2e-plugin-reset"
    pytester.makepyfile(test_a_first=RESET_FIRST, test_b_second=RESET_SECOND)
    try:
        result = pytester.runpytest_subprocess("--xenlab-name", name, "--xenlab-reset", "module", "-p", "no:cacheprovider", "-p",
                                               "no:randomly", "-rA", timeout=900)
        result.assert_outcomes(passed=2)
        first = json.loads((pytester.path / "first.json").read_text())
        second = json.loads((pytester.path / "second.json").read_text())
        assert first["booted"] is True  # this session brought it up: the first module needed no reset
        assert second["domains"] == ["Domain-0"] and second["restored"] and second["qemu"] != first["qemu"], (first, second)
    finally:
        subprocess.run([sys.executable, "-m", "xenlab", "down", "--lab", name], capture_output=True)


XDIST = '''
import json
import os
from pathlib import Path

import pytest


@pytest.mark.parametrize("n", NUMBERS)
def test_each_worker_has_a_lab_of_its_own(xenlab_lab, xenlab_dom0, xenlab_guest_factory, n):
    guest = xenlab_guest_factory(memory="64M")
    assert guest.exec("echo up").stdout.strip() == "up"
    record = {"worker": os.environ.get("PYTEST_XDIST_WORKER"), "lab": xenlab_lab.name,
              "port": xenlab_lab.info()["ssh_port"], "qemu": xenlab_lab.info()["qemu_pid"]}
    Path(__file__).with_name(f"seen-{n}.json").write_text(json.dumps(record))
    assert n != 3, "this test fails on purpose"


'''

SHARED = '''
import json
import subprocess
import sys
from pathlib import Path


class TestSharedLab:
    """--dist loadscope sends a class's tests to one worker, so to one lab."""

    def test_write(self, xenlab_lab, xenlab_dom0):
        xenlab_dom0.check("echo grouped > /root/xdist-group-mark")
        Path(__file__).with_name("group-write.json").write_text(json.dumps({"lab": xenlab_lab.name}))

    def test_read(self, xenlab_lab, xenlab_dom0):
        # Reads what test_write wrote: only true on the same lab.
        assert xenlab_dom0.check("cat /root/xdist-group-mark").strip() == "grouped"
        Path(__file__).with_name("group-read.json").write_text(json.dumps({"lab": xenlab_lab.name}))


def test_the_cli_drives_the_sessions_lab_meanwhile(xenlab_lab):
    # The session booted this lab; gdb on it goes through libvirt, which the
    # session's process must not be holding.
    gdb = subprocess.run([sys.executable, "-m", "xenlab", "debug", "gdb", "--lab", xenlab_lab.name, "--",
                          "-batch", "-ex", "info registers rip"], capture_output=True, text=True, timeout=300)
    assert gdb.returncode == 0 and "rip" in gdb.stdout, gdb.stdout + gdb.stderr
'''


@pytest.mark.gate
def test_xdist_workers_get_labs_of_their_own(lab_info, pytester, dom0, monkeypatch):
    """`pytest -n 2`: each worker boots (restores) a lab named after it, on its
    own port and QEMU; the CLI works on a worker's lab meanwhile (gdb through
    libvirt); a failure's artifacts name the worker and the lab; the session
    stops both labs at the end."""
    monkeypatch.setenv("HOME", REAL_HOME)
    name = "e2e-xd"
    # --dist loadscope: a module's functions (or a class's tests) go to one worker.
    pytester.makepyfile(test_parallel_a=XDIST.replace("NUMBERS", "[0, 1]"), test_parallel_b=XDIST.replace("NUMBERS", "[2, 3]"),
                        test_shared=SHARED)
    try:
        result = pytester.runpytest_subprocess("-n", "2", "--dist", "loadscope", "--xenlab-name", name, "-p", "no:cacheprovider",
                                               "-p", "no:randomly", "-rA", timeout=1200)
        result.assert_outcomes(passed=6, failed=1)
        grouped = [json.loads((pytester.path / f"group-{step}.json").read_text())["lab"] for step in ("write", "read")]
        assert grouped[0] == grouped[1], grouped
        seen = [json.loads((pytester.path / f"seen-{n}.json").read_text()) for n in range(4)]
        workers = {s["worker"] for s in seen}
        assert workers == {"gw0", "gw1"}, seen
        for s in seen:
            assert s["lab"] == f"{name}-{s['worker']}", s
        by_worker = {s["worker"]: (s["port"], s["qemu"]) for s in seen}
        assert len(set(by_worker.values())) == 2, by_worker  # two labs: two ports, two QEMUs
        failed = seen[3]
        folder = pytester.path / "xenlab-artifacts" / "test_parallel_b.py_test_each_worker_has_a_lab_of_its_own_3"
        where = (folder / "where.txt").read_text()
        assert f"lab {failed['lab']}, xdist worker {failed['worker']}" in where, where
        assert f"lab {failed['lab']}, xdist worker {failed['worker']}: saved in" in result.stdout.str()
        # The session booted both labs, so it stopped both.
        for worker in workers:
            status = json.loads(subprocess.run([sys.executable, "-m", "xenlab", "status", "--lab", f"{name}-{worker}", "--json"],
                                               capture_output=True, text=True).stdout)
            assert status["state"] == "down", status
    finally:
        for worker in ("gw0", "gw1"):
            subprocess.run([sys.executable, "-m", "xenlab", "down", "--lab", f"{name}-{worker}"], capture_output=True)
