"""What a guest is made of: a GuestSpec (memory, vCPUs, disks, NIC, kernel,
root) with its validation, before anything touches the lab."""

from __future__ import annotations

import re
from dataclasses import dataclass

from xenlab.config import parse_mib, validate_name
from xenlab.errors import ConfigError

ROOTS = ("busybox", "python")
KERNELS = ("minimal", "debian")
TYPES = ("pv",)


HOTPLUG = ("xenlab", "stock")


MAX_DISKS = 8


MAX_MEMORY = 16384  # MiB; Xen's free memory is checked in dom0 too


MIN_MEMORY = {"busybox": 32, "python": 96}


@dataclass(frozen=True)
class DiskSpec:
    size_mib: int
    readonly: bool = False

    @classmethod
    def parse(cls, text: str) -> "DiskSpec":
        """'64M', '1G', '16M:ro'."""
        size, _, mode = text.partition(":")
        if mode not in ("", "ro", "rw"):
            raise ConfigError(f"--disk {text!r}: mode must be ro or rw", "write it like 64M or 64M:ro")
        mib = parse_mib(size, f"--disk {text!r}")
        if mib > 1 << 20:
            raise ConfigError(f"--disk {text!r} is larger than 1 TiB", "lab disks live in dom0's filesystem; use a few MB to GB")
        return cls(mib, mode == "ro")


@dataclass(frozen=True)
class GuestSpec:
    name: str
    memory: int = 128
    vcpus: int = 1
    disks: tuple[DiskSpec, ...] = ()
    net: bool = False
    kernel: str = "minimal"
    root: str = "busybox"
    type: str = "pv"
    timeout: float = 120.0
    extra: str = ""  # appended to the guest kernel's command line
    hotplug: str = "xenlab"  # xenlab: small sh scripts; stock: Xen's /etc/xen/scripts

    def validate(self) -> "GuestSpec":
        validate_name(self.name, "guest name")
        if self.kernel not in KERNELS:
            raise ConfigError(f"unknown --kernel {self.kernel!r}", f"choose one of {', '.join(KERNELS)}")
        if self.root not in ROOTS:
            raise ConfigError(f"unknown --root {self.root!r}", f"choose one of {', '.join(ROOTS)}")
        if self.type not in TYPES:
            raise ConfigError(
                f"guest type {self.type!r} is not supported", "only PV guests run under TCG here (PVH dies on RDTSCP emulation; see docs/architecture.md)"
            )
        low = MIN_MEMORY[self.root]
        if not low <= self.memory <= MAX_MEMORY:
            raise ConfigError(f"guest memory {self.memory} MiB is out of range", f"a {self.root} guest needs {low} to {MAX_MEMORY} MiB, e.g. --memory 128M")
        if not 1 <= self.vcpus <= 8:
            raise ConfigError(f"guest vcpus {self.vcpus} is out of range", "use 1 to 8")
        if len(self.disks) > MAX_DISKS:
            raise ConfigError(f"{len(self.disks)} disks asked, at most {MAX_DISKS}", "drop some --disk options")
        if self.hotplug not in HOTPLUG:
            raise ConfigError(f"unknown --hotplug {self.hotplug!r}", f"choose one of {', '.join(HOTPLUG)}")
        if self.timeout <= 0:
            raise ConfigError(f"timeout must be positive, got {self.timeout}")
        if re.search(r"[\"\\\n]", self.extra):
            raise ConfigError("--extra must not contain quotes, backslashes or newlines")
        return self


def vdev(index: int) -> str:
    return "xvd" + "abcdefgh"[index]
