"""`xenlab doctor`: what the host has and lacks, each problem with its fix."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from xenlab.build import dom0 as images
from xenlab.lab import accel, versions
from xenlab.paths import BACKPORTS_INSTALL, cache_base, cache_dir, state_base

SETUP = "run ci/setup-host.sh (or apt-get install {pkg})"
TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "mmdebstrap": "mmdebstrap",
    "mkfs.ext4": "e2fsprogs",
    "cpio": "cpio",
    "depmod": "kmod",
    "zstd": "zstd",  # trixie compresses its kernel and modules with it
    "ssh": "openssh-client",
}
MIN_FREE_MIB = 6 * 1024
MIN_MEM_MIB = 3 * 1024


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _meminfo_mib(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) // 1024
    return 0


def checks(probe_kvm: bool = True) -> list[Check]:
    out = []
    for tool, pkg in TOOLS.items():
        path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
        out.append(Check(f"tool {tool}", bool(path), path or "not found", SETUP.format(pkg=pkg)))
    out.append(Check("busybox-static", Path("/bin/busybox").exists(), "/bin/busybox", SETUP.format(pkg="busybox-static")))
    try:
        import libvirt

        conn_ok, detail = True, f"libvirt-python {libvirt.getVersion() // 1000000}.{libvirt.getVersion() // 1000 % 1000}"
    except Exception as e:  # noqa: BLE001 - any import failure is the finding
        conn_ok, detail = False, str(e)
    out.append(Check("libvirt library", conn_ok, detail, "install libvirt-daemon-driver-qemu and the venv (ci/setup-host.sh)"))
    qemu_driver = any(Path(p).exists() for p in ("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so",))
    out.append(Check("libvirt QEMU driver", qemu_driver, "embedded driver module", SETUP.format(pkg="libvirt-daemon-driver-qemu")))
    try:
        sources = str(images.apt_sources())
        out.append(Check("apt sources", True, sources))
    except Exception as e:  # noqa: BLE001
        out.append(Check("apt sources", False, str(e), "configure apt; mmdebstrap uses the host's sources file"))
    out.append(_qemu_check())
    out.append(_private_check())
    cache = cache_dir()
    free = shutil.disk_usage(cache).free // (1024 * 1024)
    out.append(Check("disk space", free >= MIN_FREE_MIB, f"{free} MiB free under {cache}", f"free space or set XENLAB_CACHE (need {MIN_FREE_MIB} MiB)"))
    mem = _meminfo_mib("MemAvailable")
    out.append(Check("memory", mem >= MIN_MEM_MIB, f"{mem} MiB available", f"a lab needs about {MIN_MEM_MIB} MiB"))
    out.append(_image_build_check())
    out.append(_reaping_check())
    out.append(_accel_check(probe_kvm))
    return out


SLOW_REAP_SECONDS = 0.3


def orphan_reap_seconds(limit: float = 3.0) -> float | None:
    """How long a killed orphan stays a zombie under this process: what each
    `down` and `reset` waits, since libvirt waits until the lab's daemonized
    QEMU is reaped by whoever adopted it. None: not reaped within `limit`."""
    # sh exits at once, leaving the sleep to PID 1 or the nearest subreaper.
    pid = int(subprocess.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True,
                             check=True).stdout)
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() - start > limit:
            return None
        time.sleep(0.01)
    return time.monotonic() - start


def _reaping_check() -> Check:
    seconds = orphan_reap_seconds()
    if seconds is not None and seconds < SLOW_REAP_SECONDS:
        return Check("orphan reaping", True, f"a killed orphan is reaped in {seconds:.2f} s")
    took = "more than 3 s" if seconds is None else f"{seconds:.2f} s"
    # A warning, not a failure: labs work, each stop of one just waits.
    return Check("orphan reaping", True, f"WARNING: a killed orphan is reaped only after {took} here, and each `down` "
                 "and `reset` waits that long for the lab's QEMU; run xenlab under a subreaper that reaps at once, "
                 "`tini -s -- COMMAND`, as ci/test.sh does")


def _image_build_check() -> Check:
    if os.geteuid() == 0:
        return Check("image builds", True, "as root")
    problem = images.user_namespace_problem()
    if problem:
        return Check("image builds", False, f"uid {os.geteuid()}: {problem}",
                     images.subid_setup_hint(pwd.getpwuid(os.getuid()).pw_name))
    return Check("image builds", True, f"uid {os.geteuid()}, in a user namespace (subordinate ids)")


def _qemu_check() -> Check:
    binary = versions.qemu_binary()
    version = versions.qemu_version(binary)
    if not version:
        return Check("QEMU version", False, f"{binary} not found", SETUP.format(pkg="qemu-system-x86"))
    shown = f"{version} ({versions.stack_name(binary)}: {binary})"
    if versions.qemu_too_old(version):
        # A warning, not a failure: the lab works, but one thing Xen sees differs from hardware.
        return Check("QEMU version", True, f"{shown}: WARNING: before 8.0, TCG gives Xen a wrong #GP error code for a guest's "
                     f"`int $N` through a DPL-0 gate (QEMU issue 1382); install QEMU 10 from bookworm-backports with "
                     f"{BACKPORTS_INSTALL}")
    return Check("QEMU version", True, shown)


def _private_check() -> Check:
    """The cache holds dom0's SSH host key and the state the labs' keys: only their owner may enter."""
    loose = [f"{p} ({p.stat().st_mode & 0o777:o})" for p in (cache_base(), state_base(), state_base() / "labs")
             if p.exists() and p.stat().st_mode & 0o077]
    if loose:
        return Check("private directories", False, "readable by others: " + ", ".join(loose), "chmod 700 them (xenlab does on its next command)")
    return Check("private directories", True, f"{cache_base()} and {state_base()}: 0700 (or not made yet)")


def _accel_check(probe: bool) -> Check:
    kernel = None
    for image_dir in sorted(images.images_dir().glob("dom0-*")):
        if (image_dir / "vmlinuz").exists():
            kernel = image_dir / "vmlinuz"
    if kernel is None or not probe:
        exists = os.path.exists("/dev/kvm")
        return Check("accelerator", True, f"/dev/kvm {'present' if exists else 'absent'}; probe runs after the first build", "")
    choice = accel.choose("auto", kernel)
    return Check("accelerator", True, f"{choice.accel.upper()} will be used: {choice.reason}")
