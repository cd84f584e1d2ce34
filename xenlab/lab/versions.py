"""Which QEMU and libvirt run the labs: shown by doctor, status and verify,
and QEMU's age checked (before 8.0 its TCG hands Xen a wrong #GP error code
for a software interrupt through a DPL-0 gate, QEMU issue 1382: a PV guest's
`int $N` then fails where hardware would pass it to the guest)."""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import cache

QEMU_FIXED = (8, 0)  # the first QEMU whose TCG gets that error code right


def qemu_binary(configured: str = "") -> str:
    """The qemu-system-x86_64 a lab runs: `[lab] qemu` when set, else the one on PATH."""
    return configured or shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"


@cache
def qemu_version(binary: str = "") -> str:
    """'7.2.19' (from `qemu-system-x86_64 --version`), or '' when QEMU is missing."""
    binary = qemu_binary(binary)
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return ""
    m = re.search(r"version (\d+\.\d+(?:\.\d+)?)", out)
    return m.group(1) if m else ""


def libvirt_version() -> str:
    """The libvirt library's version, '9.0.0'."""
    from xenlab.lab import virt

    v = virt.library_version()
    return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"


def qemu_too_old(version: str) -> bool:
    parts = tuple(int(p) for p in version.split(".")[:2]) if version else ()
    return bool(parts) and parts < QEMU_FIXED


def versions(binary: str = "") -> dict:
    return {"qemu": qemu_version(binary), "libvirt": libvirt_version(), "qemu_binary": qemu_binary(binary)}
