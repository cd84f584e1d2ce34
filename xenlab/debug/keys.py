"""Xen's debug keys (`xl debug-keys`) with just what each key printed: Xen
writes the dump into its console ring, read back with `xl dmesg` and cut
at the key's own "'K' pressed" line. Which keys exist is asked of the
running Xen (its 'h' list), so a key this Xen lacks is refused, not ignored."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from xenlab.dom0 import Dom0
from xenlab.errors import LabError

_PREFIX = re.compile(r"^\(XEN\)\s?(\[[^\]]*\]\s?)?")  # "(XEN) " and an optional console timestamp
_HANDLER = re.compile(r"^\s*key '(.)' \(ascii '[0-9a-f]+'\) => (.*)$")
# "  13 [0/0/  -   ]: s=3 n=1 x=0 d=0 p=28": pending/masked/(2-level selector bit, or "-")
_PORT = re.compile(r"^\s*(\d+) \[(\d+)/(\d+)/([^\]]*)\]:\s*(.*)$")
_DOMAIN = re.compile(r"^Event channel information for (?:domain|d)\s*(\d+)")
_SEPARATOR = "@@xenlab-debug-key"
# Xen's evtchn states (xen/include/xen/sched.h, ECS_*), as the 'e' dump numbers them.
EVTCHN_STATES = {0: "free", 1: "reserved", 2: "unbound", 3: "interdomain", 4: "pirq", 5: "virq", 6: "ipi"}


@dataclass
class KeyOutput:
    key: str
    description: str
    lines: list[str]
    complete: bool  # False: the dump outgrew Xen's console ring (the serial log has all of it)
    parsed: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"key": self.key, "description": self.description, "complete": self.complete, "lines": self.lines, **self.parsed}


def strip_prefix(line: str) -> str:
    return _PREFIX.sub("", line, count=1)


def parse_handlers(dmesg: str) -> dict[str, str]:
    """{key: description} from the output of debug key 'h'."""
    out = {}
    for line in dmesg.splitlines():
        m = _HANDLER.match(strip_prefix(line))
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def after_press(dmesg: str, key: str) -> tuple[list[str], bool]:
    """The lines Xen printed for the last press of `key` (prefix stripped),
    and whether its "pressed" line was still in the ring."""
    lines = [strip_prefix(line) for line in dmesg.splitlines()]
    marker = f"'{key}' pressed"
    starts = [i for i, line in enumerate(lines) if line.startswith(marker)]
    if not starts:
        return lines, False
    return lines[starts[-1]:], True


def parse_evtchn(lines: list[str]) -> dict:
    """The 'e' dump as {"domains": {domid: [{"port", "pending", "masked", "state", ...}]}}."""
    domains: dict[int, list[dict]] = {}
    current = None
    for line in lines:
        m = _DOMAIN.match(line.strip())
        if m:
            current = domains.setdefault(int(m.group(1)), [])
            continue
        m = _PORT.match(line)
        if m and current is not None:
            fields = dict(kv.split("=", 1) for kv in m.group(5).split() if "=" in kv)
            entry = {"port": int(m.group(1)), "pending": int(m.group(2)), "masked": int(m.group(3)),
                     **{k: _number(v) for k, v in fields.items()}}
            if isinstance(entry.get("s"), int):
                entry["state"] = EVTCHN_STATES.get(entry["s"], str(entry["s"]))
            current.append(entry)
    return {"domains": {str(d): ports for d, ports in domains.items()}}


def _number(value: str):
    try:
        return int(value, 0)
    except ValueError:
        return value


PARSERS = {"e": parse_evtchn}
# Keys that take the lab down rather than print something: refused unless forced.
DANGEROUS = {"R": "reboots the machine: Xen and dom0 go down", "%": "traps into Xen's debugger, which waits on a serial console nobody reads"}


def handlers(dom0) -> dict[str, str]:
    """The debug keys the lab's Xen has."""
    out = dom0.check("xl debug-keys h && xl dmesg", timeout=60)
    found = parse_handlers("\n".join(after_press(out, "h")[0]))
    if not found:
        raise LabError("Xen's debug key list ('h') could not be read from `xl dmesg`", "see `xenlab console` for Xen's output")
    return found


def press(lab, keys: str, force: bool = False) -> list[KeyOutput]:
    """Press each of `keys` in the lab's Xen, in order; what each printed."""
    if not keys:
        raise LabError("no debug key given", "give one or more keys, e.g. `xenlab debug keys e` (`h` lists them)")
    risky = [k for k in keys if k in DANGEROUS]
    if risky and not force:
        raise LabError(f"debug key {risky[0]!r} {DANGEROUS[risky[0]]}", "press it anyway with --force")
    with Dom0(lab) as dom0:
        known = handlers(dom0)
        unknown = [k for k in keys if k not in known]
        if unknown:
            raise LabError(f"this Xen has no debug key {', '.join(repr(k) for k in unknown)}",
                           "its keys: " + ", ".join(f"{k} ({d})" for k, d in sorted(known.items())))
        script = "; ".join(f"xl debug-keys {shlex.quote(k)} && xl dmesg && echo {_SEPARATOR}" for k in keys)
        out = dom0.check(script, timeout=120)
    results = []
    for key, chunk in zip(keys, out.split(_SEPARATOR), strict=False):
        lines, complete = after_press(chunk, key)
        parsed = PARSERS[key](lines) if key in PARSERS else {}
        results.append(KeyOutput(key, known[key], lines, complete, parsed))
    return results
