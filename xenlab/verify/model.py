"""verify's model: check names, the five states, a check's Result and the
Context shared by one run's checks, and the pure rules (exit codes, --skip)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from xenlab.errors import ConfigError, XenlabError
from xenlab.guest.spec import DiskSpec, GuestSpec
from xenlab.xenstore.client import XenStore

if TYPE_CHECKING:
    from xenlab.api import Lab
    from xenlab.guest.manager import Guests

STATES = ("SUCCESS", "SKIP", "FAILURE", "ERROR", "CRASH")
GUEST_DISKS = ("16M", "8M:ro")
DEVCHAN_ARGS = "--count 2000 --size 2048 --op echo"
PING_COUNT = 500  # evtchn.ping: enough for stable percentiles, ~0.3 s of round trips
# The checks in run order (the ring.* results are named by the dom0 I/O check itself).
CHECKS = (
    "lab.boot", "lab.dom0", "guest.create", "xenbus.trace-create", "xenstore.layout", "xenstore.perms",
    "ring", "evtchn.catalogue", "evtchn.ping", "devchan.echo", "guest.destroy", "xenbus.trace-destroy", "xen.tools",
    "lab.crash-scan",
)
TOOL_TEST_TIMEOUT = 300  # seconds for each of Xen's test-* programs (each takes a few under TCG)


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


def skip_matches(name: str, skips: tuple[str, ...]) -> bool:
    """--skip ring skips every ring.* result; --skip evtchn.catalogue just that one."""
    return any(name == s or name.startswith(s + ".") or (s == "ring" and name.startswith("ring")) for s in skips)


def validate_skips(skips: tuple[str, ...]) -> tuple[str, ...]:
    known = set(CHECKS) | {c.split(".")[0] for c in CHECKS}
    bad = [s for s in skips if s not in known]
    if bad:
        raise ConfigError(f"--skip {bad[0]!r} names no check", f"checks: {', '.join(CHECKS)} (or a group: lab, guest, xenbus, xenstore, ring, evtchn, devchan, xen)")
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


@dataclass
class Context:
    lab: Lab
    guest: str
    guest_extra: str = ""
    guest_type: str = "pv"  # pvh: Debian's kernel (xenlab's minimal one is PV only)
    guests: Guests | None = None
    xs: XenStore | None = None
    domid: int | None = None
    created: dict | None = None
    timeline: list = field(default_factory=list)
    traces: dict = field(default_factory=dict)  # "create"/"destroy" -> its XenBus timeline, for the HTML pages
    lab_crashed: str | None = None  # set once Xen/dom0/the VM is gone: later checks are not tried
    guest_crashed: str | None = None  # set once the guest crashed: only its destroy is still tried
    lab_stalled: str | None = None  # the serial log says the lab VM stopped running for minutes (it went on)
    booted_here: bool = False
    log: Callable[[str], None] = lambda line: None

    def spec(self) -> GuestSpec:
        return GuestSpec(name=self.guest, memory=128, disks=tuple(DiskSpec.parse(d) for d in GUEST_DISKS), net=True,
                         root="python", extra=self.guest_extra, type=self.guest_type,
                         kernel="minimal" if self.guest_type == "pv" else "debian").validate()

    def store(self) -> XenStore:
        if self.xs is None or not self.xs.connected:
            self.xs = XenStore.for_lab(self.lab, timeout=30)
        return self.xs
