"""`xenlab verify`: every check the project has, against the real lab.

Each check is a small function that reuses the library's own API (Lab,
Guests, XenStore, the layout/perms/tracer checks, the agent's catalogue and
device channel) and returns evidence, or raises CheckFailed. The runner
turns each into a Result with one of five states:

    SUCCESS  the check ran and held
    SKIP     not run: the user asked (--skip, "allowed") or a check it needs
             did not succeed (not allowed)
    FAILURE  the check ran and what it saw is wrong
    ERROR    the check could not run to a verdict (tool or connection error)
    CRASH    Xen, dom0 or the guest crashed (panic in a log, a domain in
             state 'c', the lab VM gone); details carry the log tail

One python guest (two disks, one read-only, and a NIC) is created for the
run and destroyed at the end, whatever happened in between."""

from __future__ import annotations

import json
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import validate_name
from .errors import ConfigError, XenlabError

STATES = ("SUCCESS", "SKIP", "FAILURE", "ERROR", "CRASH")
GUEST_DISKS = ("16M", "8M:ro")
DEVCHAN_ARGS = "--count 2000 --size 2048 --op echo"
PING_COUNT = 500  # evtchn.ping: enough for stable percentiles, ~0.3 s of round trips
# The checks in run order (the ring.* results are named by the dom0 I/O check itself).
CHECKS = (
    "lab.boot", "lab.dom0", "guest.create", "xenbus.trace-create", "xenstore.layout", "xenstore.perms",
    "ring", "evtchn.catalogue", "evtchn.ping", "devchan.echo", "guest.destroy", "xenbus.trace-destroy", "lab.crash-scan",
)
GUEST_PANIC = (re.compile(r"Kernel panic - not syncing.*"), re.compile(r"XENLAB-GUEST-PANIC: .*"), re.compile(r"crashed: .*"))


class VerifyError(XenlabError):
    """Some check was not SUCCESS (or an allowed SKIP); exit 3 when one was a CRASH."""


class CheckFailed(Exception):
    """A check saw something wrong: a one-line evidence and optional details."""

    def __init__(self, evidence: str, details: str = ""):
        super().__init__(evidence)
        self.evidence, self.details = evidence, details


@dataclass
class Result:
    name: str
    state: str
    seconds: float = 0.0
    evidence: str = ""
    details: str = ""  # multi-line: findings, or the log tail of a CRASH
    allowed: bool = False  # a SKIP the user asked for
    data: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.state == "SUCCESS" or (self.state == "SKIP" and self.allowed)

    def to_dict(self) -> dict:
        return asdict(self)


# -- rules (pure) -------------------------------------------------------------------

def skip_matches(name: str, skips: tuple[str, ...]) -> bool:
    """--skip ring skips every ring.* result; --skip evtchn.catalogue just that one."""
    return any(name == s or name.startswith(s + ".") or (s == "ring" and name.startswith("ring")) for s in skips)


def validate_skips(skips: tuple[str, ...]) -> tuple[str, ...]:
    known = set(CHECKS) | {c.split(".")[0] for c in CHECKS}
    bad = [s for s in skips if s not in known]
    if bad:
        raise ConfigError(f"--skip {bad[0]!r} names no check", f"checks: {', '.join(CHECKS)} (or a group: lab, guest, xenbus, xenstore, ring, evtchn, devchan)")
    if any(skip_matches("lab.boot", (s,)) for s in skips):
        raise ConfigError("lab.boot cannot be skipped: every other check needs the lab", "skip the checks after it instead")
    return skips


def exit_code(results: list[Result]) -> int:
    if any(r.state == "CRASH" for r in results):
        return 3
    return 0 if all(r.passed for r in results) else 1


def summary(results: list[Result]) -> dict:
    counts = {s: sum(r.state == s for r in results) for s in STATES}
    counts["allowed_skips"] = sum(r.state == "SKIP" and r.allowed for r in results)
    return counts


def failure_message(results: list[Result]) -> str:
    bad = [r for r in results if not r.passed]
    listed = ", ".join(f"{r.name} ({r.state}{': ' + r.evidence[:80] if r.evidence else ''})" for r in bad[:6])
    more = f" and {len(bad) - 6} more" if len(bad) > 6 else ""
    return f"verify: {len(bad)} of {len(results)} checks not SUCCESS: {listed}{more}"


def one_line(text: str, width: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def report_dict(lab_name: str, results: list[Result], seconds: float, started_at: float, guest: str) -> dict:
    return {
        "lab": lab_name, "guest": guest, "started_at": started_at, "seconds": round(seconds, 2),
        "ok": exit_code(results) == 0, "exit_code": exit_code(results), "summary": summary(results),
        "checks": [r.to_dict() for r in results],
    }


def junit_xml(results: list[Result], seconds: float, suite: str = "xenlab verify") -> str:
    """JUnit XML as Jenkins/GitLab/GitHub readers take it: classname = group, name = check.
    FAILURE -> <failure>, ERROR and CRASH -> <error type=...>, SKIP -> <skipped>."""
    s = summary(results)
    root = ET.Element("testsuites", name=suite, tests=str(len(results)), failures=str(s["FAILURE"]),
                      errors=str(s["ERROR"] + s["CRASH"]), skipped=str(s["SKIP"]), time=f"{seconds:.2f}")
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(results)), failures=str(s["FAILURE"]),
                       errors=str(s["ERROR"] + s["CRASH"]), skipped=str(s["SKIP"]), time=f"{seconds:.2f}")
    for r in results:
        group, _, rest = r.name.partition(".")
        case = ET.SubElement(ts, "testcase", classname=f"xenlab.verify.{group}", name=rest or group, time=f"{r.seconds:.2f}")
        body = r.details or r.evidence
        if r.state == "FAILURE":
            ET.SubElement(case, "failure", message=one_line(r.evidence, 500), type="FAILURE").text = body
        elif r.state in ("ERROR", "CRASH"):
            ET.SubElement(case, "error", message=one_line(r.evidence, 500), type=r.state).text = body
        elif r.state == "SKIP":
            ET.SubElement(case, "skipped", message=("allowed: " if r.allowed else "") + one_line(r.evidence, 500))
        ET.SubElement(case, "system-out").text = f"{r.state}: {r.evidence}"
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def check_output_path(path: Path | None, option: str) -> None:
    """Refuse an unwritable report path before the lab is touched."""
    if path is None:
        return
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a directory", f"name a file, e.g. {path / ('verify.' + option.strip('-'))}")
    if not path.parent.is_dir():
        raise ConfigError(f"{option} {path}: directory {path.parent} does not exist", f"mkdir -p {path.parent}")


# -- crash detection ----------------------------------------------------------------

def serial_crash(text: str, lines: int = 40) -> tuple[str, str] | None:
    """A Xen panic or dom0 crash in the lab's serial log: (line, log tail)."""
    from .orchestrate.serial import CRASH_PATTERNS
    from .run import tail

    text = text.replace("\r", "")
    for pattern in CRASH_PATTERNS:
        m = pattern.search(text)
        if m:
            # The tail from the crash line on (what follows a panic is its backtrace).
            return m.group(0).strip(), tail(text[: m.start()], 10) + "\n" + "\n".join(text[m.start():].splitlines()[:lines])
    return None


def guest_crash(console_text: str, xl_state: str | None) -> str | None:
    """A crashed domU: xl's 'c' state flag, or a panic on its console."""
    for pattern in GUEST_PANIC[:2]:
        m = pattern.search(console_text)
        if m:
            return m.group(0).strip()
    if xl_state and "c" in xl_state:
        return f"domain is in state {xl_state} (crashed) in `xl list`"
    return None


# -- the run ------------------------------------------------------------------------

@dataclass
class Context:
    lab: object  # orchestrate.lab.Lab
    guest: str
    guest_extra: str = ""
    guests: object | None = None  # guest.manager.Guests
    xs: object | None = None  # xenstore.XenStore
    domid: int | None = None
    created: dict | None = None
    timeline: list = field(default_factory=list)
    lab_crashed: str | None = None  # set once Xen/dom0/the VM is gone: later checks are not tried
    guest_crashed: str | None = None  # set once the guest crashed: only its destroy is still tried
    booted_here: bool = False
    log: Callable[[str], None] = lambda line: None

    def spec(self):
        from .guest.manager import DiskSpec, GuestSpec

        return GuestSpec(name=self.guest, memory=128, disks=tuple(DiskSpec.parse(d) for d in GUEST_DISKS), net=True,
                         root="python", extra=self.guest_extra).validate()

    def store(self):
        from .xenstore.client import XenStore

        if self.xs is None or not self.xs.connected:
            self.xs = XenStore.for_lab(self.lab, timeout=30)
        return self.xs


def detect_crash(ctx: Context, message: str = "") -> tuple[str, str] | None:
    """(what crashed, log tail) if the hypervisor, dom0, the lab VM or the guest crashed."""
    lab = ctx.lab
    try:
        text = lab.serial_log.read_text(errors="replace")
    except OSError:
        text = ""
    found = serial_crash(text)
    if found:
        ctx.lab_crashed = found[0]
        return f"lab crashed: {found[0]}", f"--- {lab.serial_log} ---\n{found[1]}"
    try:
        running = lab.running()
    except Exception:  # noqa: BLE001 - libvirt trouble is not a crash verdict
        running = True
    if not running:
        ctx.lab_crashed = "the lab VM is gone"
        from .run import tail

        return "the lab VM stopped", f"--- {lab.serial_log} ---\n{tail(text, 40)}"
    m = next((m for p in GUEST_PANIC if (m := p.search(message))), None)
    if m:
        ctx.guest_crashed = m.group(0)[:200]
        return f"guest {ctx.guest} crashed: {m.group(0)[:200]}", message[-4000:]
    if ctx.guests is None:
        return None  # no guest made yet: a console log there is an older run's
    try:
        from .orchestrate.lab import parse_xl_list

        with lab.ssh(timeout=10) as ssh:
            state = next((d["state"] for d in parse_xl_list(ssh.check("xl list")) if d["name"] == ctx.guest), None)
            console = ssh.run(f"tail -n 60 /var/log/xen/console/guest-{ctx.guest}.log 2>/dev/null").stdout
    except XenlabError:
        return None
    what = guest_crash(console, state)
    if what:
        ctx.guest_crashed = what
        return f"guest {ctx.guest} crashed: {what}", f"--- console of {ctx.guest} (dom0: /var/log/xen/console/guest-{ctx.guest}.log) ---\n{console}"
    return None


def run_one(ctx: Context, results: list[Result], name: str, fn: Callable[[Context], object], needs: tuple[str, ...], skips: tuple[str, ...]) -> None:
    """Run `fn` (returns evidence, or (evidence, details), or a list of Results) into `results`."""
    by_name = {r.name: r for r in results}
    if skip_matches(name, skips):
        results.append(Result(name, "SKIP", evidence="skipped with --skip", allowed=True))
        return
    if ctx.lab_crashed:
        results.append(Result(name, "SKIP", evidence=f"not tried: the lab crashed ({one_line(ctx.lab_crashed, 100)})"))
        return
    if ctx.guest_crashed and "guest.create" in needs and name != "guest.destroy":
        results.append(Result(name, "SKIP", evidence=f"not tried: the guest crashed ({one_line(ctx.guest_crashed, 100)})"))
        return
    for dep in needs:
        got = [r for r in results if r.name == dep or r.name.startswith(dep + ".")] or ([by_name[dep]] if dep in by_name else [])
        if not got or not all(r.passed for r in got):
            allowed = bool(got) and all(r.state == "SKIP" and r.allowed for r in got)
            state = got[0].state if got else "not run"
            results.append(Result(name, "SKIP", evidence=f"needs {dep} ({state})", allowed=allowed))
            return
    ctx.log(f"> {name} ...")
    start = time.monotonic()
    details = ""
    try:
        out = fn(ctx)
        if isinstance(out, list):
            for r in out:
                if skip_matches(r.name, skips):
                    r.state, r.allowed, r.evidence = "SKIP", True, "skipped with --skip (ran as part of its group)"
            results.extend(out)
            bad = next((r for r in out if r.state not in ("SUCCESS", "SKIP")), None)
            if bad:
                crash = detect_crash(ctx)
                if crash:
                    bad.state, bad.evidence, bad.details = "CRASH", crash[0], crash[1] + "\n\n" + bad.details
            ctx.log(f"  {name}: " + ", ".join(f"{n} {s}" for s, n in summary(out).items() if n and s in STATES))
            return
        evidence, details = out if isinstance(out, tuple) else (out, "")
        state = "SUCCESS"
    except CheckFailed as e:
        state, evidence, details = "FAILURE", e.evidence, e.details
    except XenlabError as e:
        state, evidence, details = "ERROR", e.message.splitlines()[0] if e.message else type(e).__name__, str(e)
    except Exception as e:  # noqa: BLE001 - one broken check must not hide the others' verdicts
        import traceback

        state, evidence, details = "ERROR", f"{type(e).__name__}: {e}", traceback.format_exc()
    if state != "SUCCESS":
        crash = detect_crash(ctx, details)
        if crash:
            # The tail first; the check's own error after it unless it is that same text.
            state, evidence, details = "CRASH", crash[0], crash[1] if details.strip() in crash[1] else crash[1] + "\n\n" + details
    r = Result(name, state, round(time.monotonic() - start, 2), one_line(evidence, 400), details)
    ctx.log(f"  {r.state} {name} ({r.seconds:.1f} s): {one_line(r.evidence, 120)}")
    results.append(r)


def verify(lab, guest: str = "verify", skips: tuple[str, ...] = (), guest_extra: str = "", log: Callable[[str], None] | None = None) -> tuple[list[Result], Context]:
    """Run every check; the guest is destroyed at the end whatever happened."""
    from . import verify_checks as c

    validate_name(guest, "--guest")
    validate_skips(skips)
    ctx = Context(lab=lab, guest=guest, guest_extra=guest_extra, log=log or (lambda line: None))
    ctx.spec()  # bad --guest-extra is refused before the lab is touched
    results: list[Result] = []
    plan = (
        ("lab.boot", c.boot, ()),
        ("lab.dom0", c.dom0_services, ("lab.boot",)),
        ("guest.create", c.guest_create, ("lab.dom0",)),
        ("xenbus.trace-create", c.trace_create, ("guest.create",)),
        ("xenstore.layout", c.xenstore_layout, ("guest.create",)),
        ("xenstore.perms", c.xenstore_perms, ("guest.create",)),
        ("ring", c.ring_io, ("guest.create",)),
        ("evtchn.catalogue", c.evtchn_catalogue, ("guest.create",)),
        ("evtchn.ping", c.evtchn_ping, ("guest.create",)),
        ("devchan.echo", c.device_channel, ("guest.create",)),
        ("guest.destroy", c.guest_destroy, ("guest.create",)),
        ("xenbus.trace-destroy", c.trace_destroy, ("guest.destroy",)),
        ("lab.crash-scan", c.crash_scan, ("lab.boot",)),
    )
    try:
        for name, fn, needs in plan:
            run_one(ctx, results, name, fn, needs, skips)
    finally:
        c.cleanup(ctx)
    return results, ctx


def write_reports(results: list[Result], report: dict, json_path: Path | None, junit_path: Path | None) -> None:
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if junit_path is not None:
        junit_path.write_text(junit_xml(results, report["seconds"]))
