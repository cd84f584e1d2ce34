"""Guest kernels, built out of tree (make O=DIR) and cached: xenlab's minimal
PV kernel from Debian's linux-source, and a Linux tree of the user's, each
`make tinyconfig` plus xenlab/data/guest-kernel/minimal.config (and the
user's own fragment). The build directory is kept: out-of-tree modules build
against it (`xenlab guest kernel-dir`), and a changed tree is rebuilt
incrementally."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from xenlab import progress
from xenlab.agent.sysutil import atomic_write
from xenlab.build import compression
from xenlab.errors import ConfigError, HostError, XenlabError
from xenlab.paths import GUEST_KERNEL_DIR, sweep_stale_work, work_dir
from xenlab.run import run

# Bump when the build steps change in a way that changes the output.
BUILD_VERSION = "2"
SOURCE_GLOB = "linux-source-*.tar.xz"
SOURCE_DIR = Path("/usr/src")
_OPTION = re.compile(r"^(CONFIG_\w+)=([ym])$", re.MULTILINE)


def fragment_path() -> Path:
    return GUEST_KERNEL_DIR / "minimal.config"


def stock_modules_fragment_path() -> Path:
    """The minimal kernel's layer on top of fragment_path(): its frontends as modules."""
    return GUEST_KERNEL_DIR / "stock-modules.config"


def _version_key(path: Path) -> tuple[int, ...]:
    # linux-source-6.10 is newer than linux-source-6.9: compare numerically.
    version = path.name.removeprefix("linux-source-").removesuffix(".tar.xz")
    return tuple(int(p) for p in re.findall(r"\d+", version))


def source_tarball() -> Path:
    """The newest Debian linux-source tarball on the host."""
    found = sorted(SOURCE_DIR.glob(SOURCE_GLOB), key=_version_key)
    if not found:
        raise HostError(
            f"no kernel source tarball ({SOURCE_DIR / SOURCE_GLOB})",
            "install linux-source-6.1 (ci/setup-host.sh does)",
        )
    return found[-1]


def missing_options(fragment_text: str, config_text: str) -> list[str]:
    """Options the fragment sets =y or =m (a later line wins) that the final
    .config does not have set so."""
    have = dict(_OPTION.findall(config_text))
    return [opt for opt, value in dict(_OPTION.findall(fragment_text)).items() if have.get(opt) != value]


def verify_config(fragments: Path | list[Path], config: Path) -> None:
    # olddefconfig silently drops options whose dependencies are unmet; a
    # kernel without e.g. XEN_PV would only fail much later, at domU boot.
    layers = [fragments] if isinstance(fragments, Path) else fragments
    missing = missing_options("\n".join(f.read_text() for f in layers), config.read_text())
    if missing:
        raise XenlabError(
            f"kernel options did not survive olddefconfig: {', '.join(missing)}",
            f"add their dependencies to {' or '.join(str(f) for f in layers)} (see `make menuconfig` help)",
        )


def _make(tree: Path, out: Path, *args: str, log_file: Path | None, on_line=None, check: bool = True):
    """`make -C tree O=out -jN args`; run()'s result (log_file, on_line, check: as for run())."""
    # nice: the build must not starve a lab VM running on the same host.
    argv = ["nice", "-n", "10", "make", "-C", str(tree), f"O={out}", f"-j{os.cpu_count() or 1}", *args]
    return run(argv, log_file=log_file, on_line=on_line, check=check,
               hint=f"the build's full log: {log_file}" if log_file else "")


@dataclass(frozen=True)
class KernelBuild:
    """A finished out-of-tree kernel build (its build directory is kept)."""

    tree: Path  # the Linux source
    build_dir: Path  # make O=: .config, Module.symvers, vmlinux (with symbols)
    bzimage: Path
    release: str
    compiled: int  # files this build compiled (0: the tree was unchanged, nothing ran)

    def to_dict(self) -> dict:
        return {"tree": str(self.tree), "build_dir": str(self.build_dir), "bzimage": str(self.bzimage),
                "vmlinux": str(self.build_dir / "vmlinux"), "release": self.release, "compiled": self.compiled}


def check_tree(tree: Path) -> Path:
    tree = tree.expanduser().resolve()
    if not (tree / "Makefile").is_file() or not (tree / "Kconfig").is_file() or not (tree / "arch/x86").is_dir():
        raise ConfigError(f"--kernel-tree {tree} is not a Linux source tree (no Makefile, Kconfig and arch/x86 there)",
                          "give the top directory of your Linux checkout")
    if (tree / ".config").exists() or (tree / "include/config").exists():
        raise ConfigError(f"--kernel-tree {tree} has been configured or built in place; kbuild refuses out-of-tree builds from it",
                          f"run `make -C {tree} mrproper` (xenlab builds into a directory of its own with O=, the tree stays clean)")
    return tree


def tree_digest(tree: Path) -> str:
    """What the tree holds, cheaply: every file's path, size and mtime (.git and
    build output skipped). A change to any source file changes it."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(tree):
        dirs[:] = sorted(d for d in dirs if d != ".git")
        for name in sorted(files):
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue
            digest.update(f"{os.path.relpath(os.path.join(root, name), tree)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _configure(tree: Path, out: Path, fragments: list[Path], log_file: Path) -> None:
    _make(tree, out, "tinyconfig", log_file=log_file)
    run([tree / "scripts/kconfig/merge_config.sh", "-m", "-O", out, out / ".config", *fragments], cwd=out, log_file=log_file)
    _make(tree, out, "olddefconfig", log_file=log_file)
    verify_config(fragments, out / ".config")


def _compile(tree: Path, out: Path, log_file: Path, steps) -> int:
    """make bzImage and modules (Module.symvers: what out-of-tree modules link against); files compiled."""
    # The total for "compiled N/M files", from a dry run: it prints every
    # compile as "echo '  CC ...'" (counted as substrings: -j output can merge
    # lines). Measured on 6.1, 2 cores: 9 s, ~6 s of it syncconfig and objtool,
    # real work the build then skips; so ~3 s of a ~5 min build. It stops
    # (exit 2) at vmlinux.a, which it does not create, so the boot code built
    # after vmlinux is counted by its C files: a few are not built, so the
    # count ends a little below the total rather than past it. An incremental
    # build compiles what changed, so the dry run's count is the total there too.
    steps.status("counting the files to compile (make -n bzImage)")
    # Out of tree, objtool's build stops a dry run at its missing output directory.
    (out / "tools/objtool").mkdir(parents=True, exist_ok=True)
    planned = _make(tree, out, "-n", "bzImage", log_file=None, check=False).stdout.count(b"echo '  CC ")
    boot = tree / "arch/x86/boot"
    late = len([*boot.glob("*.c"), *boot.glob("compressed/*.c")]) if planned > 50 else 0
    compiled = progress.LineCount(steps, r"^\s+CC\s", planned + late if planned else None, "compiled", "files")
    _make(tree, out, "bzImage", "modules", log_file=log_file, on_line=compiled)
    return compiled.count


def build_tree(tree: Path, cache: Path, config: Path | None = None, force: bool = False, trust_stamp: bool = False,
               layers: tuple[Path, ...] = (), minimal: bool = False) -> KernelBuild:
    """Build a Linux tree out of tree with xenlab's fragment (and `config`, a
    fragment of the user's) merged into tinyconfig. One build directory per
    (tree, fragments), kept: an unchanged tree is not rebuilt at all, a
    changed one is rebuilt incrementally by make. A build that fails leaves
    no entry that could be used (its stamp is written only at the end).
    trust_stamp: a finished build is taken without reading the tree again
    (xenlab's own source tree, which nothing but xenlab writes). layers:
    xenlab's fragments merged between its own and the user's. minimal: this
    is xenlab's own guest kernel (recorded, so only those are ever pruned)."""
    tree = check_tree(Path(tree))
    fragments = [fragment_path(), *layers] + ([Path(config).expanduser().resolve()] if config else [])
    for fragment in fragments:
        if not fragment.is_file():
            raise ConfigError(f"--config {fragment}: no such file", "give a Kconfig fragment: lines like CONFIG_FOO=y")
    key = hashlib.sha256("\0".join([str(tree), BUILD_VERSION] + [_settings(f.read_text()) for f in fragments]).encode()).hexdigest()[:16]
    entry = cache / "kernels" / key
    out, stamp, bzimage = entry / "build", entry / "stamp.json", entry / "bzImage"
    entry.mkdir(parents=True, exist_ok=True)
    steps = progress.current()
    done = _read_stamp(stamp)
    if trust_stamp and not force and done and bzimage.exists():
        return KernelBuild(tree, out, bzimage, done["release"], 0)
    with open(entry / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build of a tree at a time
        digest = tree_digest(tree)
        done = _read_stamp(stamp)
        if not force and done.get("digest") == digest and bzimage.exists():
            return KernelBuild(tree, out, bzimage, done["release"], 0)
        stamp.unlink(missing_ok=True)
        log_file = entry / "build.log"
        log_file.write_text("")
        started = time.monotonic()
        if force or not (out / ".config").exists():
            steps.status("configuring: tinyconfig + xenlab's fragment" + (f" + {fragments[1].name}" if config else ""))
            _configure(tree, out, fragments, log_file)
        count = _compile(tree, out, log_file, steps)
        release = (out / "include/config/kernel.release").read_text().strip()
        part = bzimage.with_suffix(".part")
        shutil.copy2(out / "arch/x86/boot/bzImage", part)
        part.replace(bzimage)
        stamp.write_text(json.dumps({"digest": digest, "release": release, "tree": str(tree), "fragments": [str(f) for f in fragments],
                                     "user_config": str(fragments[-1]) if config else None, "minimal": minimal,
                                     "build_seconds": round(time.monotonic() - started, 1), "compiled": count}, indent=2) + "\n")
        return KernelBuild(tree, out, bzimage, release, count)


def build_stamp(built: KernelBuild) -> dict:
    """What the build recorded when it finished (its digest, release, time, files compiled)."""
    return _read_stamp(built.bzimage.parent / "stamp.json")


def _settings(fragment: str) -> str:
    """A fragment's settings without its comments: a reworded comment is no new kernel."""
    lines = (line.strip() for line in fragment.splitlines())
    return "\n".join(line for line in lines if line.startswith("CONFIG_") or re.match(r"# CONFIG_\w+ is not set", line))


def _read_stamp(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def minimal_source(cache: Path) -> Path:
    """Debian's linux-source, extracted once into the cache (whole or not at all)."""
    tarball = source_tarball()
    tag = hashlib.sha256(f"{tarball.name}\0{tarball.stat().st_size}".encode()).hexdigest()[:12]
    final = cache / f"src-{tarball.name.removesuffix('.tar.xz')}-{tag}"
    if (final / ".complete").exists():
        return final / "linux"
    sweep_stale_work(cache, ".src-")
    scratch = work_dir(cache, ".src-")
    try:
        progress.current().status(f"extracting {tarball.name}")
        run(["tar", "-xaf", tarball, "-C", scratch])
        (top,) = [p for p in scratch.iterdir() if p.is_dir()]  # linux-source-X.Y/
        top.rename(scratch / "linux")
        (scratch / ".complete").touch()
        try:
            scratch.rename(final)
        except OSError:
            if not (final / ".complete").exists():  # not a concurrent extraction winning
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final / "linux"


def build_minimal(cache: Path, force: bool = False, trust_stamp: bool = False) -> KernelBuild:
    """xenlab's own guest kernel: Debian's linux-source with the fragment alone."""
    built = build_tree(minimal_source(cache), cache, force=force, trust_stamp=trust_stamp,
                       layers=(stock_modules_fragment_path(),), minimal=True)
    if built.compiled:
        _prune_minimal(cache, built)
    return built


def stock_modules(built: KernelBuild) -> dict[str, Path]:
    """{module name: .ko} a build made (modules.order: the minimal kernel's
    frontends), in load order; names with underscores, as the kernel has them."""
    order = built.build_dir / "modules.order"
    names = order.read_text().split() if order.is_file() else []
    found = {}
    for rel in names:
        ko = built.build_dir / (rel[:-2] + ".ko" if rel.endswith(".o") else rel)
        if not ko.is_file():
            raise HostError(f"the kernel build in {built.build_dir} lists {rel} but has no {ko.name}", "rebuild it: `xenlab guest build --force`")
        found[ko.name.removesuffix(".ko").replace("-", "_")] = ko
    return found


def _prune_minimal(cache: Path, current: KernelBuild) -> None:
    """Earlier minimal kernels (another fragment, another builder) are dead weight: ~150 MB each."""
    for stamp in cache.glob("kernels/*/stamp.json"):
        done = _read_stamp(stamp)
        # Builds of this tree by `--kernel-tree` are the user's. Stamps before
        # "minimal" had no layers: a user's build had a "user_config" (and
        # before that, a second fragment).
        if "minimal" in done:
            xenlabs = done["minimal"]
        else:
            xenlabs = not done.get("user_config") if "user_config" in done else len(done.get("fragments", [])) == 1
        if stamp.parent != current.bzimage.parent and done.get("tree") == str(current.tree) and xenlabs:
            shutil.rmtree(stamp.parent, ignore_errors=True)
    for old in cache.glob("guest-kernel-*"):  # the layout before out-of-tree builds
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def decompress_bzimage(bzimage: bytes) -> bytes:
    """The ELF vmlinux inside an x86 bzImage (xz, gzip or zstd payload).

    Xen decompresses a bzImage dom0 kernel itself, which takes about 4.5 s
    under TCG; handing it the ELF skips that on every boot."""
    setup_sects = bzimage[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = bzimage[start : start + payload_length]
    kind = compression.kind_of(payload)
    if kind is None:
        raise HostError(f"unsupported kernel compression (payload starts {payload[:6].hex()})",
                        "build it with CONFIG_KERNEL_XZ, CONFIG_KERNEL_GZIP or CONFIG_KERNEL_ZSTD")
    # The kernel's build appends the decompressed size (4 bytes) to the payload; zstd refuses trailing bytes.
    elf = compression.decompress(payload[:-4] if kind == "zst" else payload, kind)
    if not elf.startswith(b"\x7fELF"):
        raise HostError("the decompressed dom0 kernel is not an ELF file")
    return elf


def minimal_vmlinux(bzimage: Path) -> Path:
    """The ELF inside `bzimage` beside it (what is shipped to dom0), renewed when the bzImage is."""
    elf = bzimage.with_name("vmlinux")
    if not elf.exists() or elf.stat().st_mtime_ns < bzimage.stat().st_mtime_ns:
        atomic_write(elf, decompress_bzimage(bzimage.read_bytes()))
    return elf
