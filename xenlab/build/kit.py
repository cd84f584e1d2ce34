"""The domU kit: what guest roots take from the dom0 image, exported while
its rootfs is still a directory (the image keeps only an ext4 disk).

- python/: dom0's python3 (3.11 on bookworm), the shared libraries it links, the standard library
  compiled into one zip (imports read .pyc from it: nothing to compile at
  each start under TCG) and the few extension modules the agents use.
- modules/: the Debian kernel's Xen frontends, for `--kernel debian` guests,
  in load order (modules.order)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from xenlab.errors import HostError
from xenlab.run import run

# Extension modules whose only dependencies are in the kit (libc, libm, libz,
# libexpat); newer Pythons build some into the interpreter (no file to copy).
DYNLOAD = ("_asyncio", "_contextvars", "_json", "_multiprocessing", "_posixshmem", "_queue", "_typing", "mmap", "resource", "termios")
# Parts of the standard library no agent needs; they are half its size.
STDLIB_EXCLUDE = (
    "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data", "distutils", "site-packages",
    "dist-packages", "sqlite3", "dbm", "curses", "venv", "xmlrpc", "wsgiref", "lib-dynload", "__pycache__",
)
# Debian kernel modules a PV domU needs: the frontends and the /dev/xen devices.
GUEST_MODULES = ("xen-blkfront", "xen-netfront", "xenfs", "xen-evtchn", "xen-gntdev", "xen-gntalloc")

# Runs inside the dom0 rootfs (chroot) so the .pyc match its python3 exactly.
ZIP_STDLIB = """
import sys, zipfile, py_compile, tempfile, os
from pathlib import Path
root, out, exclude = Path(sys.argv[1]), sys.argv[2], set(sys.argv[3].split(","))
tmp = tempfile.mkdtemp()
with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
    for src in sorted(root.rglob("*.py")):
        rel = src.relative_to(root)
        if set(rel.parts[:-1]) & exclude or rel.parts[0] in exclude or rel.parts[0].startswith("config-"):
            continue
        pyc = os.path.join(tmp, "m.pyc")
        try:
            py_compile.compile(str(src), cfile=pyc, dfile=str(src), doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        except py_compile.PyCompileError:
            continue  # a few test fixtures are not valid Python on purpose
        z.write(pyc, str(rel.with_suffix(".pyc")))
"""


def export(rootfs: Path, kver: str, dest: Path, log_file: Path) -> None:
    from xenlab.build.initramfs import copy_modules  # images imports this module

    python = dest / "python"
    interpreter = os.readlink(rootfs / "usr/bin/python3")  # "python3.11"
    _copy_into(rootfs, f"/usr/bin/{interpreter}", python)
    for lib in _shared_libs(rootfs, f"/usr/bin/{interpreter}"):
        _copy_into(rootfs, lib, python)
    dynload = f"/usr/lib/{interpreter}/lib-dynload"
    for name in DYNLOAD:
        for so in (rootfs / dynload.lstrip("/")).glob(f"{name}.cpython-*.so"):
            _copy_into(rootfs, f"{dynload}/{so.name}", python)
    (python / "usr/bin/python3").symlink_to(interpreter)
    inside = "/tmp/xenlab-stdlib.zip"
    run(["chroot", rootfs, f"/usr/bin/{interpreter}", "-c", ZIP_STDLIB, f"/usr/lib/{interpreter}", inside, ",".join(STDLIB_EXCLUDE)], log_file=log_file)
    # Where that python looks for its standard library as a zip: python311.zip.
    shutil.move(rootfs / inside.lstrip("/"), python / f"usr/lib/{interpreter.replace('.', '')}.zip")

    modules = dest / "modules"
    modules.mkdir(parents=True)
    names = copy_modules(rootfs / "lib/modules" / kver, GUEST_MODULES, modules)
    (modules / "modules.order").write_text("\n".join(names) + "\n")


def _shared_libs(rootfs: Path, binary: str) -> list[str]:
    """Absolute paths (inside rootfs) of the libraries `binary` loads, loader included."""
    out = run(["chroot", rootfs, "ldd", binary]).stdout.decode()
    libs = []
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and parts[parts.index("=>") + 1].startswith("/"):
            libs.append(parts[parts.index("=>") + 1])
        elif parts and parts[0].startswith("/"):
            libs.append(parts[0])
    if not libs:
        raise HostError(f"ldd found no libraries for {binary} in the dom0 rootfs:\n{out}")
    return libs


def resolve_in(rootfs: Path, path: str, depth: int = 0) -> Path:
    """rootfs/path with every symlink resolved as if rootfs were / (Debian's
    /lib64 and ld.so links are absolute and would escape to the host)."""
    if depth > 40:
        raise HostError(f"symlink loop resolving {path} in {rootfs}")
    current = rootfs
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        candidate = current / part
        if candidate.is_symlink():
            link = os.readlink(candidate)
            base = "/" if link.startswith("/") else "/" + str(current.relative_to(rootfs))
            rest = "/".join(parts[i + 1 :])
            return resolve_in(rootfs, os.path.normpath(os.path.join(base, link, rest)), depth + 1)
        current = candidate
    return current


def _copy_into(rootfs: Path, path: str, dest: Path) -> None:
    target = dest / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(resolve_in(rootfs, path), target)
