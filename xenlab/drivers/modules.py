"""A kernel module file of the user's, read on the host: its name, the
release it was built for, and the XenBus device types it drives."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from xenlab.build.elf import modinfo_entries
from xenlab.errors import ConfigError


@dataclass(frozen=True)
class ModuleFile:
    """A .ko of the user's, read on the host."""

    path: Path
    name: str  # as the kernel names it (underscores)
    release: str  # from its vermagic
    kinds: tuple[str, ...]  # the XenBus device types it drives as a frontend (its xen:TYPE aliases)
    backend_kinds: tuple[str, ...]  # ... and serves as a backend (its xen-backend:TYPE aliases)
    data: bytes


def read_module(path: str | Path) -> ModuleFile:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{path}: no such file", "give the .ko your build made (make -C \"$(xenlab guest kernel-dir)\" M=$PWD modules)")
    data = p.read_bytes()
    if not data.startswith(b"\x7fELF"):
        raise ConfigError(f"{path} is not a kernel module (not an ELF file)", "give the .ko file your module build made")
    entries = modinfo_entries(data, str(path))
    info = dict(reversed(entries))
    vermagic = info.get("vermagic", "")
    if not vermagic:
        raise ConfigError(f"{path} has no vermagic: not a module built by kbuild", "build it with `make -C KERNEL_DIR M=$PWD modules`")
    name = info.get("name") or p.name.removesuffix(".ko").replace("-", "_")
    aliases = [value for key, value in entries if key == "alias"]
    kinds = tuple(sorted({a[4:] for a in aliases if a.startswith("xen:")}))
    backend_kinds = tuple(sorted({a[12:] for a in aliases if a.startswith("xen-backend:")}))
    return ModuleFile(p, name, vermagic.split()[0], kinds, backend_kinds, data)


def check_params(params: str, example: str) -> None:
    """Module parameters go into a shell command line in the guest or dom0: name=value words only."""
    if params and any(c in params for c in "\"'\\\n;&|$`<>"):
        raise ConfigError(f"module parameters {params!r}: write them as name=value words", f"e.g. {example!r}")
