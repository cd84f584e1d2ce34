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

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from xenlab.config import validate_name
from xenlab.errors import XenlabError
from xenlab.guest.spec import check_type_for_config
from xenlab.verify import checks as c
from xenlab.verify.crash import detect_crash
from xenlab.verify.model import (
    STATES,
    CheckFailed,
    Context,
    Result,
    VerifyError,
    exit_code,
    failure_message,
    one_line,
    skip_matches,
    summary,
    validate_skips,
)
from xenlab.verify.reports import check_output_path, report_dict, write_reports, write_timelines


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
    data: dict = {}
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
        evidence, details, data = (*out, {})[:3] if isinstance(out, tuple) else (out, "", {})
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
        elif ctx.lab_stalled:  # detect_crash read it from the serial log just now
            evidence, details = f"{evidence} ({ctx.lab_stalled})", f"{details}\n\n{ctx.lab_stalled}"
    r = Result(name, state, round(time.monotonic() - start, 2), one_line(evidence, 400), details, data=data)
    ctx.log(f"  {r.state} {name} ({r.seconds:.1f} s): {one_line(r.evidence, 120)}")
    results.append(r)


def verify(lab, guest: str = "verify", skips: tuple[str, ...] = (), guest_extra: str = "", log: Callable[[str], None] | None = None,
           guest_type: str = "pv") -> tuple[list[Result], Context]:
    """Run every check; the guest is destroyed at the end whatever happened."""
    validate_name(guest, "--guest")
    validate_skips(skips)
    ctx = Context(lab=lab, guest=guest, guest_extra=guest_extra, guest_type=guest_type, log=log or (lambda line: None))
    ctx.spec()  # bad --guest-extra is refused before the lab is touched
    check_type_for_config(guest_type, lab.running_config(), lab.info())  # as is a guest type this lab cannot run
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
        ("xen.tools", c.xen_tool_tests, ("lab.dom0",)),
        ("lab.crash-scan", c.crash_scan, ("lab.boot",)),
    )
    try:
        for name, fn, needs in plan:
            run_one(ctx, results, name, fn, needs, skips)
    finally:
        c.cleanup(ctx)
    return results, ctx




@dataclass
class Outcome:
    """One verify run: the results, the report written, and whether it booted and stopped the lab."""

    results: list[Result]
    report: dict
    seconds: float
    booted_here: bool
    stopped: bool

    @property
    def exit_code(self) -> int:
        return exit_code(self.results)

    def error(self, lab) -> VerifyError | None:
        """The error a failed run ends with (exit 1, or 3 after a crash); None when all held."""
        if not self.exit_code:
            return None
        where = self.report.get("json_path") or self.report.get("junit_path") or "rerun with --json FILE"
        pages = "".join(f"; XenBus timeline: {p}" for p in self.report.get("xenbus_timelines") or ())
        err = VerifyError(failure_message(self.results), f"details: {where}; serial log: {lab.serial_log}{pages}")
        err.exit_code = self.exit_code
        return err


def run(lab, guest: str = "verify", skips: tuple[str, ...] = (), guest_extra: str = "", json_path: Path | None = None,
        junit_path: Path | None = None, down_after: bool = False, log: Callable[[str], None] | None = None, guest_type: str = "pv") -> Outcome:
    """`xenlab verify`: every check, the reports written, and the lab stopped
    afterwards when `down_after` and this run booted it."""
    check_output_path(json_path, "--json")
    check_output_path(junit_path, "--junit")
    started_at, t0 = time.time(), time.monotonic()
    results, ctx = verify(lab, guest=guest, skips=skips, guest_extra=guest_extra, log=log, guest_type=guest_type)
    seconds = time.monotonic() - t0
    report = report_dict(lab.name, results, seconds, started_at, guest, (lab.info() or {}).get("versions"))
    report.update(guest_type=guest_type, suite=lab.running_config().dom0.suite, lab_stalled=ctx.lab_stalled)
    first_report = json_path or junit_path
    if first_report:
        report["xenbus_timelines"] = write_timelines(ctx.traces, first_report, guest)
    write_reports(results, report, json_path, junit_path)
    report.update(json_path=str(json_path) if json_path else None, junit_path=str(junit_path) if junit_path else None)
    stopped = bool(down_after and ctx.booted_here)
    if stopped:
        lab.down()
    return Outcome(results, report, seconds, ctx.booted_here, stopped)
