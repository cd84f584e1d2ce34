"""verify's reports: the JSON document, JUnit XML and the one-line-per-check table."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from xenlab.errors import ConfigError
from xenlab.verify.model import Result, exit_code, one_line, summary
from xenlab.xenstore.timeline_html import write_html
from xenlab.xenstore.tracer import check


def report_dict(lab_name: str, results: list[Result], seconds: float, started_at: float, guest: str, versions: dict | None = None) -> dict:
    return {
        "lab": lab_name, "guest": guest, "started_at": started_at, "seconds": round(seconds, 2), "versions": versions or {},
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


def write_reports(results: list[Result], report: dict, json_path: Path | None, junit_path: Path | None) -> None:
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if junit_path is not None:
        junit_path.write_text(junit_xml(results, report["seconds"]))


def write_timelines(traces: dict, beside: Path, guest: str) -> list[str]:
    """The run's XenBus traces as HTML pages next to its report: <report stem>-xenbus-<create|destroy>.html."""
    written = []
    for action, timeline in traces.items():
        path = beside.with_name(f"{beside.stem}-xenbus-{action}.html")
        write_html(path, timeline, check(timeline), f"xenlab verify: XenBus states of guest {guest} ({action})")
        written.append(str(path))
    return written


def table_lines(results, seconds: float, width: int = 200) -> list[str]:
    """One line per check (check, result, time, evidence), plain text so that
    CI logs keep it aligned at any terminal width."""
    w = min(max(len(r.name) for r in results), 56)
    lines = [f"{'check':<{w}}  {'result':<9}  {'time':>7}  evidence"]
    for r in results:
        state = "SKIP*" if r.state == "SKIP" and r.allowed else r.state
        head = f"{one_line(r.name, w):<{w}}  {state:<9}  {r.seconds:>6.1f}s  "
        lines.append(head + one_line(r.evidence, max(40, width - len(head))))
    allowed_note = "; SKIP* = an allowed skip (asked for, or a known limit of the lab, said why)" if any(r.allowed for r in results) else ""
    lines.append(f"{len(results)} checks in {seconds:.0f} s{allowed_note}")
    return lines
