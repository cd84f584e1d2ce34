"""Build (and cache) the minimal Xen PV domU kernel from Debian's linux-source.

The kernel is `make tinyconfig` plus guest-kernel/minimal.config. Builds are
cached under a recipe id, so an unchanged recipe never rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import tempfile
import time
import zlib
from pathlib import Path

from xenlab.errors import HostError, XenlabError
from xenlab.paths import GUEST_KERNEL_DIR
from xenlab.run import run

# Bump when the build steps change in a way that changes the output.
BUILD_VERSION = "1"
SOURCE_GLOB = "linux-source-*.tar.xz"
SOURCE_DIR = Path("/usr/src")
_OPTION_Y = re.compile(r"^(CONFIG_\w+)=y$", re.MULTILINE)


def fragment_path() -> Path:
    return GUEST_KERNEL_DIR / "minimal.config"


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


def recipe_id() -> str:
    """Changes whenever the source, the fragment or the build steps change."""
    tarball = source_tarball()
    digest = hashlib.sha256()
    digest.update(f"{tarball.name}\0{tarball.stat().st_size}\0".encode())
    digest.update(fragment_path().read_bytes())
    digest.update(f"\0{BUILD_VERSION}".encode())
    return digest.hexdigest()[:16]


def missing_options(fragment_text: str, config_text: str) -> list[str]:
    """Options the fragment sets =y that are not =y in the final .config."""
    have = set(_OPTION_Y.findall(config_text))
    return [opt for opt in _OPTION_Y.findall(fragment_text) if opt not in have]


def verify_config(fragment: Path, config: Path) -> None:
    # olddefconfig silently drops options whose dependencies are unmet; a
    # kernel without e.g. XEN_PV would only fail much later, at domU boot.
    missing = missing_options(fragment.read_text(), config.read_text())
    if missing:
        raise XenlabError(
            f"kernel options did not survive olddefconfig: {', '.join(missing)}",
            f"add their dependencies to {fragment} (see `make menuconfig` help)",
        )


def _make(src: Path, *args: str, log_file: Path | None, on_line=None, check: bool = True):
    """`make -jN args` in src; run()'s result (log_file, on_line, check: as for run())."""
    # nice: the build must not starve a lab VM running on the same host.
    return run(["nice", "-n", "10", "make", f"-j{os.cpu_count() or 1}", *args], cwd=src, log_file=log_file, on_line=on_line, check=check)


def _configure_and_build(src: Path, log_file: Path) -> None:
    # A local import keeps this change inside this function while kernel.py is
    # being restructured: move it up to the module's imports then.
    from xenlab import progress

    steps = progress.current()  # the caller's "minimal guest kernel" step, if any
    fragment = fragment_path()
    steps.status("configuring: make tinyconfig + minimal.config, make olddefconfig")
    _make(src, "tinyconfig", log_file=log_file)
    run(["scripts/kconfig/merge_config.sh", "-m", ".config", fragment], cwd=src, log_file=log_file)
    _make(src, "olddefconfig", log_file=log_file)
    verify_config(fragment, src / ".config")
    # The total for "compiled N/M files", from a dry run: it prints every
    # compile as "echo '  CC ...'" (counted as substrings: -j output can merge
    # lines). Measured on 6.1, 2 cores: 9 s, ~6 s of it syncconfig and objtool,
    # real work the build then skips; so ~3 s of a ~5 min build. Its 7 MB of
    # commands stay out of the log. It stops (exit 2) at vmlinux.a, which it
    # does not create, so the boot code built after vmlinux is counted by its
    # C files: a few are not built, so the count ends a little below the
    # total (875 of 883) rather than past it.
    steps.status("counting the files to compile (make -n bzImage)")
    planned = _make(src, "-n", "bzImage", log_file=None, check=False).stdout.count(b"echo '  CC ")
    boot = src / "arch/x86/boot"
    late = len([*boot.glob("*.c"), *boot.glob("compressed/*.c")])
    compiled = progress.LineCount(steps, r"^\s+CC\s", planned + late if planned else None, "compiled", "files")
    _make(src, "bzImage", log_file=log_file, on_line=compiled)


def _extract(tarball: Path, into: Path, log_file: Path) -> Path:
    run(["tar", "-xaf", tarball, "-C", into], log_file=log_file)
    (src,) = [p for p in into.iterdir() if p.is_dir()]  # linux-source-X.Y/
    return src


def _publish(staged: Path, final: Path, scratch: Path) -> None:
    """Atomically move the fully prepared `staged` dir to `final`."""
    if final.exists():  # force rebuild: move the old build out of the way
        final.rename(scratch / "previous")
    try:
        staged.rename(final)
    except OSError:
        if not (final / "bzImage").exists():  # not a concurrent build winning
            raise


def build_minimal_kernel(cache_dir: Path, force: bool = False, log_file: Path | None = None) -> Path:
    """Return the cached bzImage for the current recipe, building it if needed."""
    rid = recipe_id()
    final = cache_dir / f"guest-kernel-{rid}"
    if (final / "bzImage").exists() and not force:
        return final / "bzImage"
    cache_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_file or cache_dir / f"guest-kernel-{rid}.log"
    tarball = source_tarball()
    # Same filesystem as `final`, so the publishing rename is atomic.
    scratch = Path(tempfile.mkdtemp(prefix=".guest-kernel-build-", dir=cache_dir))
    try:
        started = time.monotonic()
        src = _extract(tarball, scratch, log_file)
        _configure_and_build(src, log_file)
        staged = scratch / "out"
        staged.mkdir()
        shutil.copy2(src / "arch/x86/boot/bzImage", staged / "bzImage")
        shutil.copy2(src / ".config", staged / "config")
        manifest = {
            "recipe_id": rid,
            "source_tarball": str(tarball),
            "build_seconds": round(time.monotonic() - started, 1),
            "bzimage_bytes": (staged / "bzImage").stat().st_size,
        }
        (staged / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _publish(staged, final, scratch)
    finally:
        # Also on failure and Ctrl-C: a kernel tree is ~1.5 GB.
        shutil.rmtree(scratch, ignore_errors=True)
    return final / "bzImage"


def decompress_bzimage(bzimage: bytes) -> bytes:
    """The ELF vmlinux inside an x86 bzImage (xz or gzip payload).

    Xen decompresses a bzImage dom0 kernel itself, which takes about 4.5 s
    under TCG; handing it the ELF skips that on every boot."""
    setup_sects = bzimage[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = bzimage[start : start + payload_length]
    if payload.startswith(b"\xfd7zXZ\x00"):
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    elif payload.startswith(b"\x1f\x8b"):
        elf = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    else:
        raise HostError(f"unsupported dom0 kernel compression (payload starts {payload[:6].hex()})", "use a Debian kernel (xz)")
    if not elf.startswith(b"\x7fELF"):
        raise HostError("the decompressed dom0 kernel is not an ELF file")
    return elf


def minimal_vmlinux(bzimage: Path) -> Path:
    elf = bzimage.with_name("vmlinux")
    if not elf.exists():
        part = elf.with_suffix(".part")
        part.write_bytes(decompress_bzimage(bzimage.read_bytes()))
        part.rename(elf)
    return elf
