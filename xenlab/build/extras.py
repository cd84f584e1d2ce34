"""What a user brings into a guest: a kernel file of their own, kernel
modules loaded at boot, and files put into the root. All checked on the
host before anything starts, and packed as one extra cpio archive that is
appended to the guest's cached root (the kernel unpacks both)."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from xenlab.build.elf import is_elf64, modinfo, notes
from xenlab.build.initramfs import cpio_archive
from xenlab.build.kernel import decompress_bzimage
from xenlab.errors import ConfigError, HostError

MODULE_DIR = "/lib/modules/extra"  # in the guest
LOAD_LIST = "/etc/xenlab/load"  # in the guest: one "module [params]" a line, loaded in order by the init
PV_OPTIONS = "CONFIG_XEN_PV=y, CONFIG_XEN_BLKDEV_FRONTEND=y, CONFIG_XEN_NETDEV_FRONTEND=y, CONFIG_HVC_XEN=y"


@dataclass(frozen=True)
class KernelFile:
    path: Path
    kind: str  # "bzImage" or "ELF vmlinux"
    release: str  # as `uname -r` will print it
    elf: bytes  # what Xen's domain builder loads


def bzimage_release(data: bytes) -> str | None:
    """The release from a bzImage's setup header (its kernel_version string)."""
    if data[0x202:0x206] != b"HdrS":
        return None
    (ptr,) = struct.unpack_from("<H", data, 0x20E)
    text = data[0x200 + ptr: 0x200 + ptr + 256].split(b"\0")[0].decode(errors="replace")
    return text.split()[0] if text else None


def elf_release(data: bytes) -> str | None:
    at = data.find(b"Linux version ")
    if at < 0:
        return None
    return data[at + 14: at + 14 + 128].split()[0].decode(errors="replace")


XEN_ELFNOTE_PHYS32_ENTRY = 18  # xen/include/public/elfnote.h: where a PVH domain starts


def read_kernel(path: str | Path, option: str = "--kernel", pvh: bool = False) -> KernelFile:
    """A user's kernel: a bzImage or an ELF vmlinux that Xen can boot as a PV
    domain (or, with pvh, as a PVH one)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{option} {path}: no such file", "give the path of your bzImage (arch/x86/boot/bzImage) or vmlinux")
    data = p.read_bytes()
    if data[0x202:0x206] == b"HdrS":
        kind, release = "bzImage", bzimage_release(data)
        try:
            elf = decompress_bzimage(data)
        except HostError as e:
            raise ConfigError(f"{option} {path}: {e.message}", "build the kernel with CONFIG_KERNEL_XZ or CONFIG_KERNEL_GZIP, or give its vmlinux") from None
    elif is_elf64(data):
        kind, release, elf = "ELF vmlinux", elf_release(data), data
    else:
        raise ConfigError(f"{option} {path} is not a Linux kernel (neither a bzImage nor a 64-bit ELF vmlinux)",
                          "give arch/x86/boot/bzImage or vmlinux from your kernel build")
    if not release:
        raise ConfigError(f"{option} {path} is a {kind} without a 'Linux version' string: not a Linux kernel")
    xen_notes = {n.type for n in notes(elf, f"{option} {path}") if n.name == "Xen"}
    if not xen_notes:
        raise ConfigError(f"{option} {path} (Linux {release}) cannot boot as a Xen PV domain: it carries no Xen ELF notes",
                          f"build it with {PV_OPTIONS} (xenlab's fragment: `xenlab guest build --kernel-tree DIR` merges them)")
    if pvh and XEN_ELFNOTE_PHYS32_ENTRY not in xen_notes:
        raise ConfigError(f"{option} {path} (Linux {release}) cannot boot as a PVH domain: it has no PVH entry point (Xen note PHYS32_ENTRY)",
                          "build it with CONFIG_XEN_PVH=y, or run it as --type pv")
    return KernelFile(p, kind, release, elf)


def find_modules(directory: str | Path) -> dict[str, Path]:
    """{module name: .ko file} under a directory of .ko files or a modules_install tree."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise ConfigError(f"--modules {directory}: no such directory", "give the directory holding your .ko files (or a modules_install tree)")
    found: dict[str, Path] = {}
    for ko in sorted(d.rglob("*.ko")):
        name = ko.name[:-3].replace("-", "_")
        if name in found:
            raise ConfigError(f"--modules {directory}: two modules named {ko.name}: {found[name]} and {ko}", "keep one of them")
        found[name] = ko
    if not found:
        compressed = sorted(p.name for p in d.rglob("*.ko.*"))[:3]
        raise ConfigError(f"--modules {directory}: no .ko files found" + (f" (only compressed ones: {', '.join(compressed)})" if compressed else ""),
                          "install modules uncompressed (make modules_install without CONFIG_MODULE_COMPRESS)" if compressed else
                          "build them first, e.g. make -C \"$(xenlab guest kernel-dir)\" M=$PWD modules")
    return found


def check_modules(modules: dict[str, Path], release: str) -> None:
    """Every module must have been built for the guest kernel (its vermagic's release)."""
    for ko in modules.values():
        vermagic = modinfo(ko.read_bytes(), str(ko)).get("vermagic", "")
        built_for = vermagic.split()[0] if vermagic else "(no vermagic)"
        if built_for != release:
            raise ConfigError(
                f"module {ko} was built for kernel {built_for} (vermagic {vermagic!r}), but the guest kernel is {release}",
                "rebuild it against the guest's kernel: make -C \"$(xenlab guest kernel-dir)\" M=$PWD modules",
            )


def load_list(load: tuple[str, ...], modules: dict[str, Path]) -> list[str]:
    """`--load 'name [params]'` entries as the guest's init reads them, each checked against the modules given."""
    lines = []
    for entry in load:
        name, _, params = entry.strip().partition(" ")
        key = name.removesuffix(".ko").replace("-", "_")
        if key not in modules:
            raise ConfigError(f"--load {name}: no {key}.ko among the modules given",
                              f"modules there: {', '.join(sorted(modules)) or 'none'}" if modules else "pass --modules DIR with its .ko file")
        lines.append(f"{key} {params.strip()}".strip())
    return lines


def parse_add(entry: str) -> tuple[Path, str]:
    """`SRC:DEST` (its form checked by GuestSpec.validate) -> (host path, guest path)."""
    src, _, dest = entry.rpartition(":")
    path = Path(src).expanduser()
    if not path.exists():
        raise ConfigError(f"--add {entry!r}: {src} does not exist on this host")
    return path, dest


def overlay(modules: dict[str, Path], load_lines: list[str], adds: list[tuple[Path, str]]) -> bytes:
    """The extra root: modules under MODULE_DIR, the load list, and the added files (modes kept), as cpio.gz."""
    with tempfile.TemporaryDirectory(prefix="xenlab-overlay-") as work:
        tree = Path(work)
        if modules:
            target = tree / MODULE_DIR.lstrip("/")
            target.mkdir(parents=True)
            for name, ko in modules.items():
                shutil.copy2(ko, target / f"{name}.ko")
        if load_lines:
            listing = tree / LOAD_LIST.lstrip("/")
            listing.parent.mkdir(parents=True, exist_ok=True)
            listing.write_text("\n".join(load_lines) + "\n")
        for src, dest in adds:
            target = tree / dest.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, target, symlinks=True, dirs_exist_ok=True)
            else:
                shutil.copy2(src, target)
        # Same input, same bytes (the overlay is cached by its hash): no
        # build-time mtimes or inode numbers in the archive.
        for path in [tree, *tree.rglob("*")]:
            os.utime(path, (0, 0), follow_symlinks=False)
        return gzip.compress(cpio_archive(tree, "-R", "0:0", "--reproducible"), compresslevel=6, mtime=0)
