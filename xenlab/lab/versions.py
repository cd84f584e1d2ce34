"""Which QEMU and libvirt run the labs: shown by doctor, status and verify,
and QEMU's age checked (before 8.0 its TCG hands Xen a wrong #GP error code
for a software interrupt through a DPL-0 gate, QEMU issue 1382: a PV guest's
`int $N` then fails where hardware would pass it to the guest)."""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import cache

from xenlab.paths import backports_qemu

QEMU_FIXED = (8, 0)  # the first QEMU whose TCG gets that error code right


def stock_qemu() -> str:
    """Debian's own QEMU: the qemu-system-x86_64 on PATH."""
    return shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"


def qemu_binary(configured: str = "") -> str:
    """The qemu-system-x86_64 a lab runs for `[lab] qemu`: "" (the default) is
    the backports QEMU when installed (the faster stack, without the #GP bug;
    docs/versions.md) and else the stock one; "stock" and "backports" name
    one of them; anything else is a path."""
    if configured == "stock":
        return stock_qemu()
    if configured == "backports":
        return backports_qemu()
    return configured or backports_qemu() or stock_qemu()


def stack_name(binary: str) -> str:
    """'backports', 'stock' or 'own' for a QEMU binary path."""
    if binary and binary == backports_qemu():
        return "backports"
    return "stock" if binary == stock_qemu() else "own"


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
    path = qemu_binary(binary)
    return {"qemu": qemu_version(binary), "libvirt": libvirt_version(), "qemu_binary": path, "qemu_stack": stack_name(path)}
