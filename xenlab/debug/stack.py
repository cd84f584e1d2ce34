"""A guest's registers and kernel stack from Xen (xenctx in dom0), with
names from the System.map of the kernel the guest runs."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from xenlab.agent.facts import XEN_BIN
from xenlab.errors import GuestError
from xenlab.guest.manager import Guests

XENCTX = f"{XEN_BIN}/xenctx"
_FRAME = re.compile(r"\[<([0-9a-f]+)>\]\s+(\S+)?")
_RIP = re.compile(r"^\s*rip:\s+([0-9a-f]+)\s*(\S+)?", re.M)
_VCPU = re.compile(r"^\s*(?:VCPU|vcpu)\s*(\d+):?", re.M)


@dataclass
class VcpuStack:
    vcpu: int
    rip: str
    rip_symbol: str
    frames: list[dict] = field(default_factory=list)  # {"address", "symbol"} outermost last

    def to_dict(self) -> dict:
        return {"vcpu": self.vcpu, "rip": self.rip, "rip_symbol": self.rip_symbol, "frames": self.frames}


@dataclass
class GuestStack:
    guest: str
    domid: int
    symbol_map: str
    text: str  # xenctx's own output
    vcpus: list[VcpuStack]

    def to_dict(self) -> dict:
        return {"guest": self.guest, "domid": self.domid, "symbol_map": self.symbol_map,
                "vcpus": [v.to_dict() for v in self.vcpus], "text": self.text}


def parse_xenctx(text: str, first_vcpu: int = 0) -> list[VcpuStack]:
    """xenctx's output, one block per vCPU (with -C each starts with 'VCPUn:')."""
    marks = list(_VCPU.finditer(text))
    blocks = ([(int(m.group(1)), text[m.end():marks[i + 1].start() if i + 1 < len(marks) else len(text)])
               for i, m in enumerate(marks)] if marks else [(first_vcpu, text)])
    out = []
    for vcpu, block in blocks:
        rip = _RIP.search(block)
        trace = re.split(r"(?:Stack|Call) Trace:", block, maxsplit=1)[1] if re.search(r"(?:Stack|Call) Trace:", block) else ""
        frames = [{"address": m.group(1), "symbol": m.group(2) or ""} for m in _FRAME.finditer(trace)]
        out.append(VcpuStack(vcpu, rip.group(1) if rip else "", (rip.group(2) or "") if rip else "", frames))
    return out


def guest_stack(lab, name: str, vcpu: int | None = None) -> GuestStack:
    """Registers and stack of each vCPU of guest `name` (or of one)."""
    with Guests(lab) as guests:
        row = next((r for r in guests.list() if r["name"] == name and "domid" in r), None)
        if row is None:
            raise GuestError(f"no running guest named {name!r} in lab {lab.name}", "list them with `xenlab guest list`")
        if vcpu is not None and not 0 <= vcpu < row.get("vcpus", 1):
            raise GuestError(f"guest {name!r} has {row.get('vcpus', 1)} vCPU(s); there is no vCPU {vcpu}",
                             f"give --vcpu 0..{row.get('vcpus', 1) - 1}")
        symbol_map = row.get("symbol_map") or ""
        argv = [XENCTX, *(["-s", symbol_map] if symbol_map else []), "-S",
                *(["-C"] if vcpu is None else []), str(row["domid"]), *([str(vcpu)] if vcpu is not None else [])]
        result = guests.ssh().run(shlex.join(argv), timeout=120)
    if not result.ok:
        raise GuestError(f"xenctx failed for guest {name!r} (exit {result.exit_status}): {result.stderr.strip()[-800:]}",
                         "is the guest still running? see `xenlab guest list`")
    return GuestStack(name, row["domid"], symbol_map, result.stdout, parse_xenctx(result.stdout, vcpu or 0))
