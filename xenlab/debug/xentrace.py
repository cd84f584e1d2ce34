"""Xen trace events recorded while a command runs in dom0 (xentrace), decoded
by xenalyze (both in Debian's xen-utils). Classes are Xen's own
(xen/include/public/trace.h); `evtchn` is the PV hypercall records (every
event channel operation is one) with the scheduler's, which show the
wake-ups a notification causes."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from xenlab.dom0 import Dom0
from xenlab.errors import LabError

CLASSES = {
    "gen": 0x0001F000, "sched": 0x0002F000, "dom0op": 0x0004F000, "hvm": 0x0008F000, "mem": 0x0010F000,
    "pv": 0x0020F000, "shadow": 0x0040F000, "hw": 0x0080F000, "guest": 0x0800F000, "all": 0xFFFFF000,
}
GROUPS = {"evtchn": ("pv", "sched")}
_MARK = "@@xenlab-xentrace"


@dataclass
class TraceRun:
    command: str
    classes: list[str]
    mask: int
    rc: int
    output: str
    trace_bytes: int
    decoded: list[str] = field(default_factory=list)
    decoded_total: int = 0  # xenalyze's lines before any cut
    counts: dict[str, int] = field(default_factory=dict)  # records per event name

    def to_dict(self) -> dict:
        return {"command": self.command, "classes": self.classes, "mask": f"{self.mask:#010x}", "rc": self.rc,
                "output": self.output, "trace_bytes": self.trace_bytes, "decoded_total": self.decoded_total,
                "counts": self.counts, "decoded": self.decoded}


def event_mask(names: list[str]) -> int:
    """The xentrace event mask for class names (Xen's, or a group such as evtchn)."""
    mask = 0
    for name in names:
        if name in GROUPS:
            mask |= event_mask(list(GROUPS[name]))
        elif name in CLASSES:
            mask |= CLASSES[name]
        else:
            raise LabError(f"unknown trace event class {name!r}",
                           "use one or more of: " + ", ".join([*GROUPS, *CLASSES]))
    return mask


# Records per event in xenalyze's lines: the word after the dNvM column, and
# for hypercalls their name ("hypercall 20 (event_channel_op)").
COUNT_AWK = r"""{ for (i = 1; i < NF; i++) if ($i ~ /^d[0-9]+v[0-9]+$/) { e = $(i + 1);
  if (e == "hypercall" && match($0, /\(([a-z_0-9]+)\)/)) e = e ":" substr($0, RSTART + 1, RLENGTH - 2);
  sub(/[^A-Za-z0-9_:].*$/, "", e); n[e]++; break } } END { for (e in n) print n[e], e }"""


def parse_counts(text: str) -> dict[str, int]:
    counts = {}
    for line in text.splitlines():
        n, _, name = line.strip().partition(" ")
        if n.isdigit() and name:
            counts[name] = int(n)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def record(lab, command: str, classes: list[str], max_lines: int = 2000, timeout: float = 600) -> TraceRun:
    """Run `command` in dom0 under xentrace (mask from `classes`); its output,
    exit code and the decoded trace."""
    if not command.strip():
        raise LabError("no command to trace", "give it after `--`, e.g. `xenlab debug xentrace -- xl list`")
    mask = event_mask(classes)
    # xentrace must have mapped the buffers before the command starts (it
    # prints nothing when ready: give it a moment), and flushes on SIGINT.
    script = f"""
d=$(mktemp -d /tmp/xenlab-xentrace.XXXXXX); trap 'rm -rf "$d"' EXIT
xentrace -D -e {mask:#x} "$d/trace.bin" 2>"$d/xentrace.err" & tracer=$!
sleep 1
if ! kill -0 $tracer 2>/dev/null; then echo "xentrace did not start: $(cat "$d/xentrace.err")" >&2; exit 97; fi
sh -c {shlex.quote(command)} >"$d/out" 2>&1; rc=$?
sleep 0.5
kill -INT $tracer; wait $tracer
echo "{_MARK} rc $rc bytes $(stat -c %s "$d/trace.bin")"
cat "$d/out"
xenalyze --dump-all "$d/trace.bin" >"$d/decoded" 2>&1
echo "{_MARK} counts"
awk {shlex.quote(COUNT_AWK)} "$d/decoded"
echo "{_MARK} decoded $(wc -l <"$d/decoded")"
head -n {int(max_lines)} "$d/decoded"
"""
    with Dom0(lab) as dom0:
        result = dom0.run(script, timeout=timeout)
    if result.exit_status == 97 or _MARK not in result.stdout:
        raise LabError(f"xentrace failed in dom0 (exit {result.exit_status}): {result.stderr.strip()[-800:]}",
                       "is another xentrace running? see `xenlab ssh -- ps -C xentrace`")
    head, rest = result.stdout.split(f"{_MARK} rc ", 1)[1].split("\n", 1)
    rc, _, size = head.split()
    output, _, rest = rest.rpartition(f"{_MARK} counts\n")
    counts, _, decoded_part = rest.partition(f"{_MARK} decoded ")
    total, _, decoded = decoded_part.partition("\n")
    return TraceRun(command, classes, mask, int(rc), output, int(size), decoded.splitlines(), int(total), parse_counts(counts))
