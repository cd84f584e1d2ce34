"""Follows the lab's serial log during boot: reports progress, spots crashes."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from xenlab.agent.facts import KERNEL_PANIC
from xenlab.run import tail

READY_MARK = "XENLAB-READY"
CRASH_PATTERNS = (
    re.compile(r"XENLAB-PANIC: .*"),
    re.compile(r"\(XEN\) Panic on CPU \d+.*"),
    re.compile(r"\(XEN\) \*+ .*(?:PANIC|panic).*"),
    re.compile(re.escape(KERNEL_PANIC) + ".*"),
    re.compile(r"\(XEN\) d0v\d+ Unhandled: .*"),
    re.compile(r"\(XEN\) FATAL .*"),
    re.compile(r"\(XEN\) Domain 0 crashed.*"),
)
# Xen found its platform timer (QEMU's HPET: 32 bits at 100 MHz, so a wrap
# every PLATFORM_TIMER_WRAP_S seconds) had wrapped unseen: Xen did not run
# for that long. Seen once under TCG on a 1-vCPU lab with a PVH guest: one
# host core at 100% in user mode, no system calls, for 410 s, then the lab
# went on (docs/verify.md#a-stalled-lab).
STALL_PATTERN = re.compile(r"\(XEN\) .*Platform timer appears to have unexpectedly wrapped (\d+) times?")
PLATFORM_TIMER_WRAP_S = 43
# Milestones in boot order, each named for the progress display.
MILESTONES = (
    ("Xen started", re.compile(r"\(XEN\) Xen version")),
    ("dom0 kernel started", re.compile(r"\(XEN\) .*(?:Std\. Loglevel|Scrubbing|\*\*\* LOADING DOMAIN 0)")),
    ("dom0 initramfs", re.compile(r"Run /init as init process")),
    ("dom0 init", re.compile(r"xenlab-init: .*filesystems mounted")),
    ("dom0 network", re.compile(r"xenlab-init: .*network up")),
    ("xenstored", re.compile(r"xenlab-init: .*xenstored up")),
    ("dom0 ready", re.compile(READY_MARK)),
)


@dataclass
class SerialWatch:
    path: Path
    offset: int = 0
    text: str = ""
    seen: list[str] = field(default_factory=list)

    def poll(self) -> tuple[list[str], str | None, bool]:
        """Read what is new: (new milestones, crash line or None, ready?)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return [], None, False
        self.offset += len(chunk)
        self.text += chunk.decode(errors="replace").replace("\r", "")
        new = [name for name, pat in MILESTONES if name not in self.seen and pat.search(self.text)]
        self.seen += new
        crash = next((m.group(0).strip() for p in CRASH_PATTERNS if (m := p.search(self.text))), None)
        return new, crash, READY_MARK in self.text

    def tail(self, lines: int = 25) -> str:
        return tail(self.text, lines)
