"""What the lab VM boots: Xen, dom0's kernel and dom0's initramfs. By
default the dom0 image's own; with `xenlab up --xen FILE` a Xen the user
built, and with `--dom0-kernel FILE --dom0-modules DIR` a dom0 kernel of
theirs (its modules travel in the initramfs into dom0's root). User files
are checked, then cached by content like images."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from xenlab.build import extras, initramfs
from xenlab.build.dom0 import DOM0_MODULES, Dom0Image
from xenlab.build.elf import build_id, is_elf, is_elf64
from xenlab.config import LabConfig
from xenlab.errors import ConfigError
from xenlab.paths import cache_dir, sweep_stale_work, work_dir

BOOT_VERSION = "1"  # bump when what is cached here changes shape
MULTIBOOT1_MAGIC = 0x1BADB002


@dataclass(frozen=True)
class BootFiles:
    xen: Path
    dom0_kernel: Path  # ELF: Xen loads it without decompressing
    initramfs: Path
    xen_build_id: str | None
    dom0_release: str
    user_xen: str = ""  # the user's files, when they brought their own
    user_dom0_kernel: str = ""
    user_dom0_modules: str = ""

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def _cached(kind: str, digest: str) -> Path:
    return cache_dir() / "boot" / f"{kind}-{digest[:16]}"


def _publish(final: Path, fill) -> Path:
    """Build an entry in a temporary directory beside it and rename it into place (never half-made)."""
    if final.exists():
        return final
    sweep_stale_work(final.parent, ".")
    work = work_dir(final.parent, f".{final.name}.")
    try:
        fill(work)
        work.rename(final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return final


def _multiboot1(data: bytes) -> bool:
    """A multiboot1 header (what QEMU's -kernel loads) in the first 8 KiB, 4-byte aligned."""
    for off in range(0, min(len(data), 8192) - 12, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic == MULTIBOOT1_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return True
    return False


def read_xen(path: str | Path) -> bytes:
    """A Xen the user built (xen.gz or xen), as the plain ELF QEMU boots."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--xen {path}: no such file", "give xen/xen.gz (or xen/xen) from your Xen build")
    data = p.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise ConfigError(f"--xen {path}: a damaged gzip file ({e})") from None
    if not is_elf(data) or b"Xen version" not in data:
        raise ConfigError(f"--xen {path} is not a Xen hypervisor image", "give xen/xen.gz (or xen/xen) from your Xen build")
    if not _multiboot1(data):
        hint = "that looks like xen-syms (the symbols); boot xen/xen.gz" if is_elf64(data) else "build Xen for x86_64 with multiboot support"
        raise ConfigError(f"--xen {path} has no multiboot header: QEMU cannot boot it", hint)
    return data


def user_xen(path: str) -> tuple[Path, str | None]:
    data = read_xen(path)
    entry = _publish(_cached("xen", hashlib.sha256(data).hexdigest()), lambda d: (d / "xen").write_bytes(data))
    return entry / "xen", build_id(data)


def modules_dir(path: str, release: str) -> Path:
    """The user's lib/modules/RELEASE for this kernel, from a modules_install tree (or that directory itself)."""
    base = Path(path).expanduser()
    if not base.is_dir():
        raise ConfigError(f"--dom0-modules {path}: no such directory", "give the directory you ran `make modules_install INSTALL_MOD_PATH=DIR` into")
    for candidate in (base / "lib/modules" / release, base / release, base):
        if (candidate / "modules.dep").exists():
            if candidate.name != release:
                raise ConfigError(f"--dom0-modules {path} holds modules for kernel {candidate.name}, but --dom0-kernel is {release}",
                                  "install the modules of the same build (make modules_install)")
            return candidate
    found = sorted(p.name for p in (base / "lib/modules").glob("*")) if (base / "lib/modules").is_dir() else []
    raise ConfigError(f"--dom0-modules {path} has no modules for kernel {release}" + (f" (it has {', '.join(found)})" if found else ""),
                      "run `make modules_install INSTALL_MOD_PATH=DIR` in your kernel build and give DIR")


def user_dom0(image: Dom0Image, kernel_path: str, modules: str) -> tuple[Path, Path, str]:
    """A dom0 kernel of the user's: its ELF and an initramfs carrying its modules."""
    kernel = extras.read_kernel(kernel_path, option="--dom0-kernel")
    if not modules:
        raise ConfigError("--dom0-kernel needs --dom0-modules DIR", "the kernel's modules_install tree: dom0 loads its Xen backends from there")
    moddir = modules_dir(modules, kernel.release)
    carried = initramfs.module_order((moddir / "modules.dep").read_text(), DOM0_MODULES + initramfs.ROOT_MODULES, initramfs.builtin_names(moddir))
    extras.check_modules({Path(rel).name: moddir / rel for rel in carried}, kernel.release)
    digest = hashlib.sha256(kernel.elf)
    for ko in sorted(moddir.rglob("*")):
        if ko.is_file():
            digest.update(f"{ko.relative_to(moddir)}\0{ko.stat().st_size}\0{ko.stat().st_mtime_ns}\0".encode())
    digest.update(f"{image.id}\0{BOOT_VERSION}".encode())

    def fill(work: Path) -> None:
        (work / "vmlinux").write_bytes(kernel.elf)
        initramfs.build_dom0(moddir, work / "initramfs.cpio", work, carry=DOM0_MODULES)
        shutil.rmtree(work / "initramfs")

    entry = _publish(_cached("dom0", digest.hexdigest()), fill)
    return entry / "vmlinux", entry / "initramfs.cpio", kernel.release


def boot_files(image: Dom0Image, cfg: LabConfig) -> BootFiles:
    xen, xen_id = user_xen(cfg.xen) if cfg.xen else (image.xen, build_id(image.xen.read_bytes()))
    if cfg.dom0.kernel:
        kernel, ramdisk, release = user_dom0(image, cfg.dom0.kernel, cfg.dom0.modules)
    else:
        if cfg.dom0.modules:
            raise ConfigError("--dom0-modules goes with --dom0-kernel", "give the kernel those modules were built for")
        kernel, ramdisk, release = image.dom0_kernel, image.initramfs, image.manifest["kernel_version"]
    return BootFiles(xen, kernel, ramdisk, xen_id, release, cfg.xen, cfg.dom0.kernel, cfg.dom0.modules)

