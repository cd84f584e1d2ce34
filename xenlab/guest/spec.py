"""What a guest is made of: a GuestSpec (memory, vCPUs, disks, NIC, kernel,
root) with its validation, before anything touches the lab."""

from __future__ import annotations

import re
from dataclasses import dataclass

from xenlab.agent.facts import KERNELS, ROOTS
from xenlab.config import parse_mib, validate_name
from xenlab.errors import ConfigError

MODULE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
TYPES = ("pv", "pvh", "hvm")
# Seconds a guest gets to be up and Connected unless told otherwise. An HVM
# guest runs SeaBIOS and a Debian kernel under nested SVM in TCG: over a
# minute to ready on a quiet host, past 120 s on a slow one (docs/performance.md).
UP_TIMEOUTS = {"pv": 120.0, "pvh": 240.0, "hvm": 360.0}
# What PVH and HVM guests need of the lab under TCG (docs/guest-types.md): a
# CPU model with SVM and nested paging,
SVM_CPUS = ("svm", "max")
# and not both of these. QEMU 9.1 moved MOV from CRn into its new decoder,
# which checks every CR read against the CR0-read intercept (exit code 0;
# still so in 10.0.2). Xen intercepts CR0 reads, so it emulates the guest's
# `mov %cr2`, and before 4.20 answers from a CR2 it never synced from the
# VMCB: 0. The guest's first page fault is then unfixable and it halts.
QEMU_MISREPORTS_CR_READS = (9, 1)
XEN_SYNCS_CR2 = (4, 20)
HOTPLUG = ("xenlab", "stock")
MAX_DISKS = 8
MAX_MEMORY = 16384  # MiB; Xen's free memory is checked in dom0 too
MIN_MEMORY = {"busybox": 32, "python": 96}


@dataclass(frozen=True)
class DiskSpec:
    size_mib: int
    readonly: bool = False

    @classmethod
    def parse(cls, text: str) -> DiskSpec:
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
    timeout: float | None = None  # None: UP_TIMEOUTS of the type
    extra: str = ""  # appended to the guest kernel's command line
    hotplug: str = "xenlab"  # xenlab: small sh scripts; stock: Xen's /etc/xen/scripts
    modules: str = ""  # a directory of .ko files (or a modules_install tree) put into the guest
    load: tuple[str, ...] = ()  # "module [params]", loaded in order at boot, before the ready line
    add: tuple[str, ...] = ()  # "SRC:DEST": host files put into the guest root
    no_stock: tuple[str, ...] = ()  # stock modules of the kernel kept off at boot (xen_blkfront, ...)

    def __post_init__(self):
        if self.timeout is None:
            object.__setattr__(self, "timeout", UP_TIMEOUTS.get(self.type, UP_TIMEOUTS["pv"]))

    @property
    def user_kernel(self) -> bool:
        """The kernel is a file of the user's (a path), not one xenlab provides."""
        return self.kernel not in KERNELS

    def vdevs(self) -> list[str]:
        """Each disk's name in the guest: xvda, xvdb, ... in order; in an HVM
        guest from xvde on (see IDE_SLOTS)."""
        first = IDE_SLOTS if self.type == "hvm" else 0
        return [vdev(first + i) for i in range(len(self.disks))]

    @property
    def root_flavour(self) -> str:
        """Which built root the guest boots: the minimal and the Debian kernel's
        carry their stock frontend modules; the one for a kernel of the user's none."""
        return "user" if self.user_kernel else self.kernel

    @property
    def kept_off(self) -> tuple[str, ...]:
        """--no-stock names as the kernel has them (xen-blkfront -> xen_blkfront)."""
        return tuple(name.removesuffix(".ko").replace("-", "_") for name in self.no_stock)

    def validate(self) -> GuestSpec:
        validate_name(self.name, "guest name")
        if not self.kernel or (self.user_kernel and "/" not in self.kernel and not self.kernel.endswith(("Image", "vmlinux"))):
            raise ConfigError(f"unknown --kernel {self.kernel!r}", f"choose {', '.join(KERNELS)}, or give the path of a bzImage or vmlinux")
        for entry in self.load:
            name, _, params = entry.strip().partition(" ")
            if not MODULE_NAME.match(name.removesuffix(".ko")) or re.search(r"[\"'\\\n;&|$`<>]", params):
                raise ConfigError(f"--load {entry!r}: write a module name and optional parameters", "e.g. --load xlecho or --load 'xlecho count=500'")
        if self.load and not self.modules:
            raise ConfigError("--load needs --modules DIR: the directory holding the modules to load")
        for name in self.no_stock:
            if not MODULE_NAME.match(name.removesuffix(".ko")):
                raise ConfigError(f"--no-stock {name!r} is not a module name", "e.g. --no-stock xen-blkfront")
        if self.no_stock and self.user_kernel:
            raise ConfigError("--no-stock: a guest of your own kernel loads no stock modules",
                              "leave the driver out of your kernel's config, or boot --kernel minimal")
        for entry in self.add:
            src, sep, dest = entry.rpartition(":")
            if not sep or not src or not dest.startswith("/") or ".." in dest.split("/"):
                raise ConfigError(f"--add {entry!r}: write it as SRC:DEST with an absolute DEST in the guest", "e.g. --add ./tool:/usr/bin/tool")
        if self.root not in ROOTS:
            raise ConfigError(f"unknown --root {self.root!r}", f"choose one of {', '.join(ROOTS)}")
        if self.type not in TYPES:
            raise ConfigError(f"unknown guest type {self.type!r}", f"choose one of {', '.join(TYPES)}")
        if self.type != "pv" and self.kernel == "minimal":
            needs = "CONFIG_XEN_PVH" if self.type == "pvh" else "CONFIG_XEN_PVHVM_GUEST (the Xen platform PCI device)"
            raise ConfigError(f"xenlab's minimal kernel boots only as a PV guest (it has no {needs})",
                              f"for --type {self.type} use --kernel debian, or a kernel of yours built with {needs}")
        low = MIN_MEMORY[self.root]
        if not low <= self.memory <= MAX_MEMORY:
            raise ConfigError(f"guest memory {self.memory} MiB is out of range", f"a {self.root} guest needs {low} to {MAX_MEMORY} MiB, e.g. --memory 128M")
        if not 1 <= self.vcpus <= 8:
            raise ConfigError(f"guest vcpus {self.vcpus} is out of range", "use 1 to 8")
        if len(self.disks) > MAX_DISKS:
            raise ConfigError(f"{len(self.disks)} disks asked, at most {MAX_DISKS}", "drop some --disk options")
        if self.hotplug not in HOTPLUG:
            raise ConfigError(f"unknown --hotplug {self.hotplug!r}", f"choose one of {', '.join(HOTPLUG)}")
        assert self.timeout is not None  # __post_init__ put in the type's default
        if self.timeout <= 0:
            raise ConfigError(f"timeout must be positive, got {self.timeout}")
        if re.search(r"[\"\\\n]", self.extra):
            raise ConfigError("--extra must not contain quotes, backslashes or newlines")
        return self


def _version(text: str | None) -> tuple[int, ...]:
    return tuple(int(part) for part in (text or "").split(".")[:2] if part.isdigit())


def check_type_on_lab(guest_type: str, accel: str, cpu: str, xen_version: str | None, vcpus: int = 1,
                      qemu_version: str | None = None) -> None:
    """Refuse a guest type the lab cannot run, before anything is shipped;
    xen_version, qemu_version None: not known here (a Xen of the user's, a
    remote host's QEMU), not checked; vcpus: the lab VM's."""
    if guest_type == "pv" or accel == "kvm":
        return
    kind = guest_type.upper()
    if cpu not in SVM_CPUS:
        article = "an" if kind == "HVM" else "a"
        raise ConfigError(f"{article} {kind} guest needs a CPU model with SVM; this lab runs TCG with --cpu {cpu}",
                          f"boot a lab with --cpu {SVM_CPUS[0]} (the default): xenlab up --cpu {SVM_CPUS[0]}")
    xen, qemu = _version(xen_version), _version(qemu_version)
    if xen and qemu and xen < XEN_SYNCS_CR2 and qemu >= QEMU_MISREPORTS_CR_READS:
        raise ConfigError(f"{kind} guests cannot run on Xen {xen_version} under QEMU {qemu_version}: "
                          "their first page fault reads CR2 as 0 and they halt",
                          "QEMU 9.1 and later report a guest's `mov %cr2` to Xen as a CR0 read, which this Xen answers "
                          "with a stale CR2 (docs/guest-types.md). Boot the lab on Debian 12's QEMU 7.2 "
                          "(xenlab up --qemu stock --vcpus 1) or on Xen 4.20 (xenlab up --suite trixie --vcpus 1)")
    if vcpus > 1:
        # QEMU runs each vCPU in a thread of its own (MTTCG); its nested SVM then
        # loses about a third of its guests to triple faults; with one vCPU, none in our runs.
        raise ConfigError(f"{kind} guests under TCG need a lab with one vCPU; this lab has {vcpus}",
                          "with more, QEMU's nested SVM loses about a third of them to triple faults (docs/guest-types.md): "
                          "boot a lab with `xenlab up --vcpus 1`")


def check_type_for_config(guest_type: str, cfg, info: dict | None) -> None:
    """check_type_on_lab from a lab's configuration, before it is booted (info:
    its running report, when it runs). Under accel "auto" on a host where KVM
    may work, the accelerator is not known yet: left to guest create."""
    from xenlab.agent.facts import XEN_VERSIONS
    from xenlab.lab.accel import kvm_device_usable
    from xenlab.lab.remote import RemoteHost
    from xenlab.lab.versions import qemu_version

    if info:
        accel = info["accel"]
    elif cfg.accel != "auto":
        accel = cfg.accel
    elif not kvm_device_usable():
        accel = "tcg"
    else:
        return
    if info:
        qemu = (info.get("versions") or {}).get("qemu")
    else:
        qemu = None if RemoteHost.of(cfg.connect) else qemu_version(cfg.qemu)
    check_type_on_lab(guest_type, accel, cfg.cpu, None if cfg.xen else XEN_VERSIONS[cfg.dom0.suite], cfg.vcpus, qemu)


def vdev(index: int) -> str:
    return "xvd" + "abcdefghijklmnop"[index]


# libxl also emulates an HVM guest's xvda-xvdd as IDE disks for its BIOS (the
# kernel, loaded directly, unplugs them at boot), and qemu-xen has no
# read-only IDE: an HVM guest's disks are named past those slots, PV only.
IDE_SLOTS = 4
