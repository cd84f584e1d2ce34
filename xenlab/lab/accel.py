"""Choose KVM or TCG by booting something, not by looking for /dev/kvm.

On some hosts /dev/kvm opens and KVM_CREATE_VM succeeds, yet a stock kernel
hangs or QEMU fails to set MSRs. So the probe boots dom0's kernel under KVM
with no root disk: reaching the "no root" panic within a few seconds proves
KVM runs a real kernel. The verdict is cached per host boot."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from xenlab.errors import ConfigError
from xenlab.paths import cache_dir

PROBE_TIMEOUT = 10.0
SUCCESS = ("VFS: Unable to mount root", "Kernel panic - not syncing")


@dataclass(frozen=True)
class AccelChoice:
    accel: str  # "kvm" or "tcg"
    reason: str


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def kvm_device_usable() -> bool:
    """/dev/kvm is there and ours to open: KVM may work (the probe decides)."""
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def probe_kvm(kernel: Path, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    if not kvm_device_usable():
        return False, "/dev/kvm is missing or not accessible"
    argv = [
        "qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-m", "256", "-nographic", "-nodefaults",
        "-no-reboot", "-serial", "stdio", "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1 root=/dev/nonexistent",
    ]
    start = time.monotonic()
    # Not run.run(): this command is expected to fail or hang, and we read its output either way.
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return False, f"a kernel under KVM did not boot within {timeout:.0f} s (KVM unusable for nested Xen here)"
    text = out.decode(errors="replace")
    if any(mark in text for mark in SUCCESS):
        return True, f"a kernel booted under KVM in {time.monotonic() - start:.1f} s"
    last = text.strip().splitlines()[-1] if text.strip() else f"exit code {proc.returncode}"
    return False, f"QEMU with KVM failed: {last}"


def choose(requested: str, kernel: Path) -> AccelChoice:
    """Resolve auto|kvm|tcg to kvm or tcg, probing (cached per host boot) when needed."""
    if requested == "tcg":
        return AccelChoice("tcg", "requested with --accel tcg")
    cache = cache_dir() / "accel-probe.json"
    key = f"{_boot_id()}:{kernel.name}:{kernel.stat().st_size}"
    verdict = None
    try:
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            verdict = (saved["kvm"], saved["reason"] + " (cached probe)")
    except (OSError, ValueError, KeyError):
        pass
    if verdict is None:
        verdict = probe_kvm(kernel)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "kvm": verdict[0], "reason": verdict[1]}))
    kvm_ok, reason = verdict
    if requested == "kvm" and not kvm_ok:
        raise ConfigError(f"--accel kvm was requested but KVM does not work here: {reason}", "use --accel tcg or auto")
    return AccelChoice("kvm", reason) if kvm_ok else AccelChoice("tcg", reason)


def as_dict(choice: AccelChoice) -> dict:
    return asdict(choice)
