"""The domU root: a small initramfs built on the host, cached by recipe.

Two roots: `busybox` (busybox-static, the init and the console exec agent:
about 1 MB) and `python` (busybox plus python3.11 with a compiled standard
library zip from the dom0 image's kit and the xenlab agent package, for the
agents that run inside guests). Each root is built for a kernel: the
minimal kernel's gets that kernel's stock frontend modules, the Debian
kernel's the Debian ones, both loaded by the init (a module of the user's
by the same name replaces one); the root for a kernel of the user's has
none."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

from xenlab import deploy, templates
from xenlab.agent.facts import (
    DOMU_AGENT_ROOT,
    EXEC_CHUNK_BYTES,
    EXEC_CHUNK_TAG,
    EXEC_END_TAG,
    EXEC_FRAMED_INPUT,
    EXEC_REPLY_TAG,
    EXEC_REQUEST_TAG,
    GUEST_PANIC_MARK,
    GUEST_READY_MARK,
)
from xenlab.build import extras
from xenlab.build.dom0 import Dom0Image
from xenlab.build.initramfs import cpio_archive
from xenlab.errors import HostError
from xenlab.run import run

BUSYBOX = Path("/bin/busybox")
BUILD_VERSION = "2"
STOCK_MODULE_DIR = "/lib/modules/stock"  # in the guest: the kernel's own modules, loaded at boot
MODULES_IN_USE = "/run/xenlab/modules"  # in the guest: one "name file origin" a line, what is loaded
TEMPLATES = ("domu-init.sh.j2", "domu-exec-agent.sh.j2")


def exec_facts() -> dict:
    """The console exec protocol's tags, as the agent in dom0 speaks it."""
    return {"request_tag": EXEC_REQUEST_TAG, "reply_tag": EXEC_REPLY_TAG, "end_tag": EXEC_END_TAG,
            "chunk_tag": EXEC_CHUNK_TAG, "chunk_bytes": EXEC_CHUNK_BYTES}


def init_facts() -> dict:
    """What the guest's init must agree on with the agent in dom0."""
    return {"agent_root": DOMU_AGENT_ROOT, "ready_mark": GUEST_READY_MARK, "panic_mark": GUEST_PANIC_MARK,
            "module_dir": extras.MODULE_DIR, "load_list": extras.LOAD_LIST, "stock_dir": STOCK_MODULE_DIR, "framed_input": EXEC_FRAMED_INPUT,
            "in_use": MODULES_IN_USE}


def stock_of(image: Dom0Image, kernel: str, minimal: dict[str, Path] | None = None) -> dict[str, Path]:
    """{module name: .ko} the root for `kernel` loads at boot, in order:
    `minimal` (kernel.stock_modules of the minimal build) or Debian's."""
    if kernel == "minimal":
        if minimal is None:
            raise HostError("the minimal kernel's root needs that kernel's modules")
        return minimal
    if kernel == "debian":
        kit = image.domu_kit / "modules"
        return {name.replace("-", "_"): kit / f"{name}.ko" for name in (kit / "modules.order").read_text().split()}
    return {}


def recipe_id(image: Dom0Image, root: str, kernel: str, stock: dict[str, Path] | None = None) -> str:
    digest = hashlib.sha256()
    parts = [BUILD_VERSION, root, kernel, image.id, _file_digest(BUSYBOX)]
    parts += [f"{name}={_file_digest(ko)}" for name, ko in (stock or {}).items()]
    parts += [templates.source(t) for t in TEMPLATES]
    if root == "python":
        parts.append(deploy.agent_version())
    for part in parts:
        digest.update(part.encode() + b"\0")
    # The image in the name: roots of another dom0 image (bookworm beside
    # trixie) are another lab's, not older builds of this one.
    return f"domu-{root}-{kernel}-{image.id}-{digest.hexdigest()[:12]}"


def _file_digest(path: Path) -> str:
    if not path.exists():
        raise HostError(f"{path} is missing", "install busybox-static (ci/setup-host.sh does)")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(image: Dom0Image, root: str, kernel: str, cache: Path, minimal: dict[str, Path] | None = None) -> Path:
    """The cached initramfs (cpio.gz) for this root and kernel ("minimal",
    "debian", or "user": a kernel of the user's); built if missing. minimal:
    the minimal kernel's stock modules (kernel.stock_modules)."""
    stock = stock_of(image, kernel, minimal)
    target = cache / f"{recipe_id(image, root, kernel, stock)}.cpio.gz"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".domu-root-", dir=cache) as work:
        tree = Path(work) / "root"
        modules = _populate(tree, image, root, stock)
        init = tree / "init"
        init.write_text(templates.render("domu-init.sh.j2", python=root == "python", modules=modules, **init_facts()))
        agent = tree / "bin/xenlab-exec-agent"
        agent.write_text(templates.render("domu-exec-agent.sh.j2", **exec_facts()))
        for script in (init, agent):
            script.chmod(0o755)
        staged = Path(work) / "initramfs.cpio.gz"
        staged.write_bytes(gzip.compress(cpio_archive(tree, "-R", "0:0"), compresslevel=6))
        staged.rename(target)
    _prune(cache, image, target, f"domu-{root}-{kernel}-")
    return target


def _prune(cache: Path, image: Dom0Image, current: Path, prefix: str) -> None:
    """Remove older builds of this root for this image (another agent or
    template version) and those of images no longer cached: dead weight. A
    root of another cached image is kept: a lab on that image still uses it."""
    for old in cache.glob(f"{prefix}*.cpio.gz"):
        built_for = old.name[len(prefix):-len(".cpio.gz")].rpartition("-")[0]  # "" in the layout without it
        if old != current and (built_for == image.id or not built_for or not (image.path.parent / built_for).is_dir()):
            old.unlink(missing_ok=True)


def _populate(tree: Path, image: Dom0Image, root: str, stock: dict[str, Path]) -> list[str]:
    for sub in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "root", "etc", STOCK_MODULE_DIR.lstrip("/")):
        (tree / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, tree / "bin/busybox")
    # Applet links made here, not by `busybox --install` at every boot.
    applets = subprocess.run([BUSYBOX, "--list-full"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        link = tree / applet
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
    (tree / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (tree / "etc/group").write_text("root:x:0:\n")
    kit = image.domu_kit
    if not kit.exists():
        raise HostError(f"the dom0 image {image.id} has no domU kit", "rebuild it: `xenlab build --force`")
    if root == "python":
        shutil.copytree(kit / "python", tree, symlinks=True, dirs_exist_ok=True)
        agent_dir = tree / DOMU_AGENT_ROOT.lstrip("/")
        agent_dir.mkdir(parents=True)
        with tempfile.NamedTemporaryFile() as tar:
            tar.write(deploy.agent_tarball())
            tar.flush()
            run(["tar", "-x", "-f", tar.name, "-C", agent_dir])
    for name, ko in stock.items():
        shutil.copy2(ko, tree / STOCK_MODULE_DIR.lstrip("/") / f"{name}.ko")
    return list(stock)
