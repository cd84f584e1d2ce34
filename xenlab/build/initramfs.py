"""Kernel modules in dependency order, cpio archives, and dom0's tiny
initramfs (busybox + the modules that mount the virtio root disk)."""

from __future__ import annotations

import shutil
from collections.abc import Collection
from pathlib import Path

from xenlab import templates
from xenlab.build import compression
from xenlab.errors import HostError
from xenlab.run import run

# What the initramfs needs to mount the virtio root disk; crc32c is only a
# soft dependency of ext4, so modules.dep does not list it.
ROOT_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")


def builtin_names(moddir: Path) -> set[str]:
    """Modules built into the kernel (modules.builtin): nothing to load for them."""
    listing = moddir / "modules.builtin"
    text = listing.read_text() if listing.exists() else ""
    return {Path(line).name.split(".ko")[0].replace("-", "_") for line in text.split()}


def module_order(modules_dep: str, wanted: tuple[str, ...], builtin: Collection[str] = frozenset()) -> list[str]:
    """Relative module paths for `wanted`, each after its dependencies (modules.dep order);
    modules in `builtin` are skipped."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in modules_dep.splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[Path(path).name.split(".ko")[0].replace("-", "_")] = path
    ordered: list[str] = []

    def visit(path: str) -> None:
        for dep in deps.get(path, []):
            visit(dep)
        if path not in ordered:
            ordered.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key in builtin:
            continue
        if key not in by_name:
            raise HostError(f"kernel module {name} not found in modules.dep", "the dom0 kernel package changed; rebuild with --force")
        visit(by_name[key])
    return ordered


def copy_modules(moddir: Path, wanted: tuple[str, ...], dest: Path) -> list[str]:
    """Copy `wanted` and their dependencies from moddir into dest as NAME.ko;
    their names in load order (built-in ones are skipped)."""
    names = []
    for rel in module_order((moddir / "modules.dep").read_text(), wanted, builtin_names(moddir)):
        name = Path(rel).name.split(".ko")[0]
        (dest / f"{name}.ko").write_bytes(plain_module(moddir / rel))
        names.append(name)
    return names


def plain_module(path: Path) -> bytes:
    """A module file's ELF: Debian compresses modules since trixie (.ko.xz),
    and busybox's insmod in the initramfs and the guests loads only plain ones."""
    data = path.read_bytes()
    kind = compression.SUFFIX.get(path.suffix)
    return compression.decompress(data, kind) if kind else data


def carry_modules(moddir: Path, wanted: tuple[str, ...], dest: Path) -> None:
    """`wanted` and their dependencies at their paths under dest, with the
    indexes modprobe reads: a kernel's modules for a root that lacks them."""
    for rel in module_order((moddir / "modules.dep").read_text(), wanted, builtin_names(moddir)):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(moddir / rel, dest / rel)
    for index in ("modules.dep", "modules.builtin", "modules.order", "modules.alias", "modules.symbols", "modules.builtin.modinfo"):
        if (moddir / index).exists():
            shutil.copy2(moddir / index, dest / index)


def build_dom0(moddir: Path, target: Path, work: Path, carry: tuple[str, ...] = ()) -> None:
    """dom0's initramfs from the kernel modules in moddir (lib/modules/RELEASE).
    carry: modules the dom0 root needs but lacks (a kernel of the user's),
    copied into its /lib/modules/RELEASE at boot."""
    busybox = Path("/bin/busybox")  # busybox-static: the initramfs has no libc
    if not busybox.exists():
        raise HostError("/bin/busybox is missing", "install busybox-static (ci/setup-host.sh does)")
    tree = work / "initramfs"
    for sub in ("bin", "dev", "proc", "sys", "newroot", "modules"):
        (tree / sub).mkdir(parents=True)
    shutil.copy2(busybox, tree / "bin/busybox")
    names = copy_modules(moddir, ROOT_MODULES, tree / "modules")
    if carry:
        carry_modules(moddir, carry, tree / "carry" / moddir.name)
    init = tree / "init"
    init.write_text(templates.render("initramfs-init.sh.j2", modules=names, root_device="/dev/vda", carry=bool(carry)))
    init.chmod(0o755)
    # Uncompressed: decompressing costs more than reading under TCG.
    target.write_bytes(cpio_archive(tree))


def cpio_archive(tree: Path, *options: str) -> bytes:
    """A newc cpio archive of everything under tree (an initramfs)."""
    listing = "\n".join(str(p.relative_to(tree)) for p in sorted(tree.rglob("*"))).encode()
    return run(["cpio", "-o", "-H", "newc", "--quiet", *options], input=listing, cwd=tree).stdout
