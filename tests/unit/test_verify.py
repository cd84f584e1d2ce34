"""`xenlab verify`'s pure parts: states and exit codes, skips, JUnit and JSON
rendering, crash detection in log text, and refusals before the lab is touched."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from click.testing import CliRunner

from xenlab.cli import main
from xenlab.diagnostics import guest_crash, serial_crash, serial_stall
from xenlab.errors import ConfigError, XenlabError
from xenlab.verify.model import CheckFailed, Context, Result, exit_code, failure_message, skip_matches, summary, validate_skips
from xenlab.verify.reports import junit_xml
from xenlab.verify.runner import run_one


def results(*states):
    return [Result(f"g.c{i}", s, 1.0, f"evidence {i}", allowed=(s == "SKIP-ok")) if s != "SKIP-ok" else
            Result(f"g.c{i}", "SKIP", 0.0, "skipped with --skip", allowed=True) for i, s in enumerate(states)]


def test_exit_code_rules():
    assert exit_code(results("SUCCESS", "SUCCESS")) == 0
    assert exit_code(results("SUCCESS", "SKIP-ok")) == 0  # allowed SKIP
    assert exit_code(results("SUCCESS", "SKIP")) == 1  # a SKIP because something it needs failed
    assert exit_code(results("SUCCESS", "FAILURE")) == 1
    assert exit_code(results("ERROR")) == 1
    assert exit_code(results("FAILURE", "CRASH")) == 3


def test_summary_and_message_name_what_failed():
    rs = results("SUCCESS", "FAILURE", "SKIP-ok", "CRASH")
    s = summary(rs)
    assert s == {"SUCCESS": 1, "SKIP": 1, "FAILURE": 1, "ERROR": 0, "CRASH": 1, "allowed_skips": 1}
    msg = failure_message(rs)
    assert msg.startswith("verify: 2 of 4 checks not SUCCESS") and "g.c1 (FAILURE: evidence 1)" in msg and "g.c3 (CRASH" in msg


def test_skip_matching_and_validation():
    assert skip_matches("ring.block xvda: guest writes", ("ring",))
    assert skip_matches("evtchn.catalogue", ("evtchn",)) and skip_matches("evtchn.catalogue", ("evtchn.catalogue",))
    assert not skip_matches("evtchn.catalogue", ("devchan",))
    assert validate_skips(("ring", "devchan.echo")) == ("ring", "devchan.echo")
    with pytest.raises(ConfigError, match="names no check"):
        validate_skips(("rings",))
    with pytest.raises(ConfigError, match="cannot be skipped"):
        validate_skips(("lab",))


def test_junit_maps_states_to_elements():
    rs = [
        Result("lab.boot", "SUCCESS", 2.5, "Xen 4.17.7"),
        Result("ring.net: bulk", "FAILURE", 1.0, "sha differs", "long details"),
        Result("evtchn.catalogue", "ERROR", 0.5, "SSH failed"),
        Result("guest.create", "CRASH", 9.0, "guest crashed: Kernel panic", "--- console ---\npanic tail"),
        Result("devchan.echo", "SKIP", 0.0, "skipped with --skip", allowed=True),
    ]
    root = ET.fromstring(junit_xml(rs, 14.0))
    suite = root.find("testsuite")
    assert suite.get("tests") == "5" and suite.get("failures") == "1" and suite.get("errors") == "2" and suite.get("skipped") == "1"
    cases = {(c.get("classname"), c.get("name")): c for c in suite.iter("testcase")}
    assert list(cases["xenlab.verify.lab", "boot"]) [0].tag == "system-out"
    assert cases["xenlab.verify.ring", "net: bulk"].find("failure").text == "long details"
    assert cases["xenlab.verify.evtchn", "catalogue"].find("error").get("type") == "ERROR"
    crash = cases["xenlab.verify.guest", "create"].find("error")
    assert crash.get("type") == "CRASH" and "panic tail" in crash.text
    assert cases["xenlab.verify.devchan", "echo"].find("skipped").get("message").startswith("allowed:")
    assert cases["xenlab.verify.guest", "create"].get("time") == "9.00"


def test_serial_crash_finds_xen_and_dom0_panics():
    log = "(XEN) Xen version 4.17\nxenlab-init: network up\n" + "\n".join(f"line {i}" for i in range(30))
    assert serial_crash(log) is None
    found = serial_crash(log + "\n(XEN) Panic on CPU 0:\n(XEN) FATAL TRAP\n(XEN) backtrace")
    assert found and found[0] == "(XEN) Panic on CPU 0:" and "backtrace" in found[1] and "line 29" in found[1]
    found = serial_crash(log + "\r\nKernel panic - not syncing: Attempted to kill init!\r\n")
    assert found[0] == "Kernel panic - not syncing: Attempted to kill init!"


def test_a_stalled_lab_is_named_and_is_not_a_crash():
    # The line Xen 4.20 printed in CI after the lab VM stalled for ~410 s.
    log = "(XEN) [   43.659641] d1v0: upcall vector f3\n(XEN) [  487.776938] Platform timer appears to have unexpectedly wrapped 9 times.\n"
    assert serial_stall(log.splitlines()[0]) is None
    stall = serial_stall(log)
    assert "stalled" in stall and "wrapped 9 times" in stall and "387 s" in stall
    assert serial_crash(log) is None


def test_guest_crash_from_console_or_xl_state():
    assert guest_crash("booted\nXENLAB-GUEST-READY\n", "-b----") is None
    assert guest_crash("Kernel panic - not syncing: VFS: Unable to mount root fs", "-b----").startswith("Kernel panic")
    assert "crashed" in guest_crash("", "----c-")


class FakeLab:
    """Enough of Lab for the runner's crash detection: a serial log and a running VM."""

    def __init__(self, tmp_path, serial="", running=True):
        self.name = "fake"
        self.serial_log = tmp_path / "serial.log"
        self.serial_log.write_text(serial)
        self._running = running

    def running(self):
        return self._running

    def fresh_serial_log(self):
        return self.serial_log

    def ssh(self, timeout=15):
        from xenlab.errors import SSHError

        raise SSHError("no lab here")


def test_runner_states_and_dependencies(tmp_path):
    ctx = Context(lab=FakeLab(tmp_path), guest="g")
    out: list[Result] = []
    run_one(ctx, out, "lab.boot", lambda c: "up", (), ())
    run_one(ctx, out, "guest.create", lambda c: (_ for _ in ()).throw(CheckFailed("not Connected", "details")), ("lab.boot",), ())
    run_one(ctx, out, "xenstore.layout", lambda c: "never runs", ("guest.create",), ())
    run_one(ctx, out, "devchan.echo", lambda c: "never runs", ("guest.create",), ("devchan",))
    run_one(ctx, out, "lab.crash-scan", lambda c: 1 / 0, ("lab.boot",), ())
    states = {r.name: (r.state, r.allowed) for r in out}
    assert states == {
        "lab.boot": ("SUCCESS", False), "guest.create": ("FAILURE", False), "xenstore.layout": ("SKIP", False),
        "devchan.echo": ("SKIP", True), "lab.crash-scan": ("ERROR", False),
    }
    assert out[2].evidence == "needs guest.create (FAILURE)"
    assert "ZeroDivisionError" in out[4].evidence and "Traceback" in out[4].details


def test_a_checks_figures_are_fields_of_its_data(tmp_path):
    ctx = Context(lab=FakeLab(tmp_path), guest="g")
    out: list[Result] = []
    run_one(ctx, out, "lab.boot", lambda c: ("up", "", {"boot_seconds": 3.5}), (), ())
    run_one(ctx, out, "lab.dom0", lambda c: ("answers", "details"), ("lab.boot",), ())
    assert [(r.state, r.data, r.details) for r in out] == [("SUCCESS", {"boot_seconds": 3.5}, ""), ("SUCCESS", {}, "details")]
    assert out[0].to_dict()["data"] == {"boot_seconds": 3.5}


def test_runner_turns_a_failure_after_a_panic_into_crash(tmp_path):
    ctx = Context(lab=FakeLab(tmp_path, "(XEN) Xen version\n(XEN) Domain 0 crashed: rebooting machine in 5 seconds.\n"), guest="g")
    out: list[Result] = []
    run_one(ctx, out, "lab.dom0", lambda c: (_ for _ in ()).throw(CheckFailed("no SSH")), (), ())
    run_one(ctx, out, "guest.create", lambda c: "never runs", (), ())
    assert out[0].state == "CRASH" and "Domain 0 crashed" in out[0].evidence and "Domain 0 crashed" in out[0].details
    assert out[1].state == "SKIP" and not out[1].allowed and "lab crashed" in out[1].evidence


def test_runner_names_a_stall_in_a_failed_check_without_calling_it_a_crash(tmp_path):
    log = "(XEN) Xen version\n(XEN) [  487.776938] Platform timer appears to have unexpectedly wrapped 9 times.\n"
    ctx = Context(lab=FakeLab(tmp_path, log), guest="g")
    out: list[Result] = []
    run_one(ctx, out, "xenstore.perms", lambda c: (_ for _ in ()).throw(XenlabError("guest 'g' did not answer within 60 s")), (), ())
    assert out[0].state == "ERROR" and "did not answer" in out[0].evidence and "the lab VM stalled" in out[0].evidence
    assert ctx.lab_stalled and "wrapped 9 times" in ctx.lab_stalled and ctx.lab_crashed is None


def test_runner_crash_when_the_vm_is_gone(tmp_path):
    ctx = Context(lab=FakeLab(tmp_path, "booting\n", running=False), guest="g")
    out: list[Result] = []
    run_one(ctx, out, "lab.dom0", lambda c: (_ for _ in ()).throw(CheckFailed("no SSH")), (), ())
    assert out[0].state == "CRASH" and out[0].evidence == "the lab VM stopped"


def test_cli_refuses_bad_input_before_touching_a_lab(tmp_path):
    runner = CliRunner()
    for args, text in (
        (["--skip", "nope"], "names no check"),
        (["--junit", str(tmp_path / "missing" / "x.xml")], "does not exist"),
        (["--json", str(tmp_path)], "is a directory"),
        (["--guest", "Bad Name"], "invalid --guest"),
        (["--guest-extra", 'a"b'], "--extra must not contain"),
    ):
        result = runner.invoke(main, ["verify", "--name", "never-up-unit", *args])
        assert result.exit_code == 2, (args, result.output)
        assert text in result.output, (args, result.output)
    from xenlab.paths import lab_dir

    assert not lab_dir("never-up-unit").exists()


def test_table_is_one_line_per_check():
    from xenlab.verify.reports import table_lines

    rs = [Result("lab.boot", "SUCCESS", 1.25, "Xen 4.17.7 " + "x" * 400), Result("devchan.echo", "SKIP", 0, "skipped with --skip", allowed=True),
          Result("guest.create", "CRASH", 3, "guest verify crashed:\nKernel panic")]
    lines = table_lines(rs, 12.0)
    assert len(lines) == 5 and lines[0].split() == ["check", "result", "time", "evidence"]
    assert lines[1].split()[:3] == ["lab.boot", "SUCCESS", "1.2s"] and len(lines[1]) <= 200 and lines[1].endswith("...")
    assert "SKIP*" in lines[2] and "allowed" in lines[-1]
    assert lines[3].split()[1] == "CRASH" and "crashed: Kernel panic" in lines[3]


def test_runner_guest_panic_in_the_error_is_a_crash_once(tmp_path):
    from xenlab.errors import GuestError

    msg = "guest 'g' crashed: Kernel panic - not syncing: VFS: Unable to mount root fs while starting\n--- console ---\nKernel panic - not syncing: VFS"
    ctx = Context(lab=FakeLab(tmp_path, "(XEN) Xen version\n"), guest="g")
    out: list[Result] = []
    run_one(ctx, out, "guest.create", lambda c: (_ for _ in ()).throw(GuestError(msg)), (), ())
    (r,) = out
    assert r.state == "CRASH" and r.evidence.startswith("guest g crashed: ") and "Kernel panic" in r.evidence
    assert r.details.count("--- console ---") == 1
    assert ctx.lab_crashed is None  # a guest crash does not stop the lab's other checks
    run_one(ctx, out, "xenstore.layout", lambda c: "never runs", ("guest.create",), ())
    run_one(ctx, out, "lab.crash-scan", lambda c: "runs", ("lab.boot",), ())
    assert out[1].state == "SKIP" and "guest crashed" in out[1].evidence and not out[1].allowed
    assert out[2].state == "SKIP" and out[2].evidence == "needs lab.boot (not run)"


def test_verify_guest_by_type():
    """verify's guest: the minimal kernel as PV; Debian's as PVH (the minimal one has no PVH entry)."""
    pv = Context(lab=None, guest="g").spec()
    pvh = Context(lab=None, guest="g", guest_type="pvh").spec()
    assert (pv.type, pv.kernel) == ("pv", "minimal")
    assert (pvh.type, pvh.kernel, pvh.root) == ("pvh", "debian", "python")
    assert pvh.disks == pv.disks and pvh.net
