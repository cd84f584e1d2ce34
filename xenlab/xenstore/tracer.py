"""XenBus states and the rules of the split-driver protocol ("Architecture for Split Drivers
Within Xen"), checked against a recorded timeline.

A timeline is the ordered list of changes of each device's frontend and
backend `state` node (plus the release of the frontend's domain). Order is
xenstored's: every change arrives as a watch event on one connection.

The protocol, per device:
- bring-up: backend Initialising -> InitWait -> Connected; frontend
  Initialising -> Initialised -> Connected (netfront may go straight from
  Initialising to Connected). The backend connects only once the frontend
  has published its ring (Initialised or Connected); blkfront connects only
  after the backend did.
- orderly closedown, backend first: backend Closing, frontend Closing then
  Closed, backend Closed (the backend answers the frontend's Closed). The
  seed's text lets the frontend answer the backend's Closing by going to
  Closed directly (its diagram draws Closing first); Linux's blkfront does
  exactly that, so it is accepted, with a note.
- frontend-initiated closedown: frontend Closing, backend Closing, frontend
  Closed, backend Closed.
- store directories are removed after Closed.
A domain destroyed under its drivers (xl destroy) cannot close its side:
that is reported as a forced teardown, not as a violation.

Watches say that a node changed, not to what: a value read after the event
may already be a later one. The recorder marks a change `maybe_skipped`
when a later event on the same node read the same value, i.e. an
intermediate state may have been missed; a forward jump at such a change,
and the cross-side order judged at it, are reported as notes, never as
violations. Which side began a closedown is taken from the order of the
events, which is exact even when a value was read late."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from xenlab.agent.facts import (  # noqa: F401 - re-exported for the tracer's users
    CLOSED,
    CLOSING,
    CONNECTED,
    INITIALISED,
    INITIALISING,
    INITWAIT,
    RECONFIGURED,
    RECONFIGURING,
    state_name,
)

# Allowed next states per side; a reconnect after Closed starts over.
BACKEND_NEXT = {
    INITIALISING: {INITWAIT, CLOSING},
    INITWAIT: {CONNECTED, CLOSING},
    CONNECTED: {CLOSING, RECONFIGURING},
    CLOSING: {CLOSED},
    CLOSED: {INITIALISING, INITWAIT},
    RECONFIGURING: {RECONFIGURED},
    RECONFIGURED: {CONNECTED},
}
FRONTEND_NEXT = {
    INITIALISING: {INITIALISED, CLOSING},
    INITIALISED: {CONNECTED, CLOSING},
    CONNECTED: {CLOSING, RECONFIGURING},
    CLOSING: {CLOSED},
    CLOSED: {INITIALISING},
    RECONFIGURING: {RECONFIGURED},
    RECONFIGURED: {CONNECTED},
}
# Frontends that may skip Initialised: they need nothing from the backend first.
STRAIGHT_TO_CONNECTED = {"vif"}


@dataclass(frozen=True)
class Change:
    t: float  # seconds since the trace started
    side: str  # backend, frontend, or domain (the frontend's domain was released)
    kind: str  # the frontend's device class: vbd, vif, ...
    devid: str
    domid: int  # the frontend's domain
    state: int | None  # None: the node was removed
    path: str = ""
    initial: bool = False  # already there when the trace started
    maybe_skipped: bool = False  # a later event read the same value: a state may have been missed

    @property
    def device(self) -> str:
        return f"{self.kind}/{self.devid}"

    def to_dict(self) -> dict:
        return {**asdict(self), "state_name": state_name(self.state) if self.side != "domain" else "released"}

    @classmethod
    def from_dict(cls, d: dict) -> Change:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class Finding:
    level: str  # violation or note
    device: str
    message: str
    change: Change | None = None

    def __str__(self) -> str:
        at = f" (at +{self.change.t:.3f} s, {self.change.side} {self.change.path})" if self.change else ""
        return f"{self.level}: {self.device}: {self.message}{at}"


@dataclass
class DeviceReport:
    device: str
    domid: int
    backend: list[int | None] = field(default_factory=list)
    frontend: list[int | None] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.level == "violation" for f in self.findings)

    def to_dict(self) -> dict:
        return {
            "device": self.device, "domid": self.domid, "ok": self.ok, "phases": self.phases,
            "backend": [state_name(s) for s in self.backend], "frontend": [state_name(s) for s in self.frontend],
            "findings": [{"level": f.level, "message": f.message, "change": f.change.to_dict() if f.change else None} for f in self.findings],
        }


def _reachable(table: dict, start: int, goal: int) -> bool:
    seen, todo = set(), [start]
    while todo:
        s = todo.pop()
        for n in table.get(s, ()):
            if n == goal:
                return True
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return False


def check(timeline: list[Change]) -> list[DeviceReport]:
    """One report per device (kind/devid of a domain), in order of first appearance."""
    released = {c.domid: c for c in timeline if c.side == "domain"}
    reports: dict[tuple[int, str], DeviceReport] = {}
    for change in timeline:
        if change.side != "domain":
            key = (change.domid, change.device)
            if key not in reports:
                reports[key] = DeviceReport(change.device, change.domid)
    for (domid, device), report in reports.items():
        changes = [c for c in timeline if c.side != "domain" and c.domid == domid and c.device == device]
        _check_device(report, changes, released.get(domid))
    return list(reports.values())


def _check_device(report: DeviceReport, changes: list[Change], released: Change | None) -> None:
    kind = report.device.split("/")[0]
    now: dict[str, int | None] = {"backend": None, "frontend": None}
    seen = {"backend": False, "frontend": False}
    frontend_closed_down = any(c.side == "frontend" and c.state in (CLOSING, CLOSED) for c in changes)
    forced = released is not None and not frontend_closed_down
    first_closing: str | None = None

    def violation(msg: str, c: Change) -> None:
        report.findings.append(Finding("violation", report.device, msg, c))

    def note(msg: str, c: Change | None = None) -> None:
        report.findings.append(Finding("note", report.device, msg, c))

    for c in changes:
        side, other = c.side, ("frontend" if c.side == "backend" else "backend")
        prev, new = now[side], c.state
        history = report.backend if side == "backend" else report.frontend
        if seen[side] and new == prev:
            continue  # the same value written again (or read twice): no transition
        history.append(new)
        table = dict(BACKEND_NEXT if side == "backend" else FRONTEND_NEXT)
        if side == "frontend" and kind in STRAIGHT_TO_CONNECTED:
            table[INITIALISING] = table[INITIALISING] | {CONNECTED}
        if not seen[side]:
            seen[side] = True
            now[side] = new
            if not c.initial and new not in (INITIALISING, None):
                msg = f"{side} appeared in state {state_name(new)}; a new device starts in Initialising"
                # A watch event carries no value: a node read right after its
                # creation may already hold the next state (one write missed).
                late = c.maybe_skipped or new in table[INITIALISING]
                (note if late else violation)(msg + (" (its Initialising was written before the first read)" if late else ""), c)
            continue
        now[side] = new
        if new is None:
            if prev != CLOSED:
                if forced or released is not None:
                    note(f"{side} node removed while {state_name(prev)}: the domain was destroyed, no closedown", c)
                elif c.maybe_skipped and prev is not None and CLOSED in table.get(prev, set()):
                    # The node was written (its own event) but gone when read: that write was most likely Closed.
                    note(f"{side} node removed right after a write not read in time (from {state_name(prev)}, most likely Closed)", c)
                else:
                    violation(f"{side} node removed while {state_name(prev)}; directories are removed only after Closed", c)
            continue
        if prev is None:
            note(f"{side} node came back in state {state_name(new)} after removal", c)
            continue
        if side == "frontend" and new == CLOSED and prev in (INITIALISED, CONNECTED) and now[other] == CLOSING:
            # Seed 003's text: on the backend's Closing the frontend tears down
            # "and then changes to state Closed"; only its diagram draws a
            # frontend Closing first. Linux blkfront/netfront do the former.
            note(f"frontend {state_name(prev)} -> Closed in answer to the backend's Closing (no frontend Closing; allowed by the seed's text)", c)
        elif new not in table.get(prev, set()):
            transition = f"{side} {state_name(prev)} -> {state_name(new)}"
            if c.maybe_skipped and _reachable(table, prev, new):
                note(f"{transition}: an intermediate state may have been missed between watch events", c)
            elif forced and new in (CLOSING, CLOSED):
                note(f"{transition} while the frontend's domain was being destroyed", c)
            else:
                expected = ", ".join(state_name(s) for s in sorted(table.get(prev, ()))) or "nothing"
                violation(f"{transition} is not allowed (after {state_name(prev)} comes {expected})", c)
                continue  # one finding per offending change
        # Cross-side ordering, judged on the other side's state at this moment.
        # A maybe_skipped value was read ahead of the event stream, so the
        # other side's state here may be stale: such a change is only noted.
        there = now[other]
        if new in (CLOSING, CLOSED) and first_closing is None:
            # Events arrive in write order even when values are read late: the
            # side whose node moved first towards Closed began the closedown.
            first_closing = side

        def cross(msg: str, c=c) -> None:
            if c.maybe_skipped:
                note(f"{msg} (not judged: this value was read after later writes, so the other side's may be out of date)", c)
            else:
                violation(msg, c)

        if not seen[other]:
            pass
        elif side == "backend" and new == CONNECTED and there not in (INITIALISED, CONNECTED):
            cross(f"backend Connected while the frontend is {state_name(there)}: it must publish its ring first (Initialised)")
        elif side == "frontend" and new == CONNECTED and kind not in STRAIGHT_TO_CONNECTED and there != CONNECTED:
            cross(f"frontend Connected before the backend (backend is {state_name(there)})")
        elif side == "backend" and new == CLOSED and there not in (CLOSED, None) and not forced:
            cross(f"backend Closed while the frontend is {state_name(there)}: the backend closes after the frontend's Closed")
        elif side == "frontend" and new == CLOSED and there not in (CLOSING, CLOSED, None) and not forced:
            cross(f"frontend Closed while the backend is {state_name(there)}: Closed follows both sides' Closing")
    _phases(report, first_closing, forced, released)


def _phases(report: DeviceReport, first_closing: str | None, forced: bool, released: Change | None) -> None:
    def reached(states: list, *wanted: int) -> bool:
        it = iter(states)
        return all(any(s == w for s in it) for w in wanted)

    if reached(report.backend, INITWAIT, CONNECTED) and CONNECTED in report.frontend:
        report.phases.append("bring-up")
    if forced:
        report.phases.append("forced teardown (domain destroyed)")
    elif first_closing == "backend":
        report.phases.append("orderly closedown (backend first)")
    elif first_closing == "frontend":
        report.phases.append("frontend-initiated closedown")
    if first_closing and not forced:
        if CLOSED not in report.frontend or CLOSED not in report.backend:
            report.findings.append(Finding("note", report.device, "closedown not finished when the trace ended"))


class TimelineFormatter:
    """One line per change, naming the transition (it remembers each node's last state)."""

    def __init__(self) -> None:
        self.last: dict[tuple[int, str, str], int | None] = {}

    def line(self, c: Change) -> str:
        if c.side == "domain":
            return f"+{c.t:8.3f} s  domain {c.domid} released by xenstored"
        key = (c.domid, c.device, c.side)
        before = f"{state_name(self.last[key])} -> " if key in self.last else ("(at start) " if c.initial else "(new) ")
        self.last[key] = c.state
        mark = "  (a state may have been missed)" if c.maybe_skipped else ""
        return f"+{c.t:8.3f} s  d{c.domid} {c.device:<12} {c.side:<8}  {before}{state_name(c.state)}{mark}"


def violations(reports: list[DeviceReport]) -> list[Finding]:
    return [f for r in reports for f in r.findings if f.level == "violation"]


def violation_summary(reports: list[DeviceReport]) -> str | None:
    """One line naming the first protocol violation (and how many more), or None."""
    bad = violations(reports)
    if not bad:
        return None
    return f"XenBus protocol violation: {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")


def format_timeline(timeline: list[Change]) -> list[str]:
    fmt = TimelineFormatter()
    return [fmt.line(c) for c in timeline]


def format_reports(reports: list[DeviceReport]) -> list[str]:
    lines = []
    for r in reports:
        verdict = "ok" if r.ok else "VIOLATION"
        lines.append(f"d{r.domid} {r.device}: {verdict}; {', '.join(r.phases) or 'no complete phase'}")
        lines.append("  backend:  " + " -> ".join(state_name(s) for s in r.backend))
        lines.append("  frontend: " + " -> ".join(state_name(s) for s in r.frontend))
        lines.extend(f"  {f.level}: {f.message}" + (f" (+{f.change.t:.3f} s)" if f.change else "") for f in r.findings)
    return lines
