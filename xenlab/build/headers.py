"""A build directory for dom0's kernel, to build modules against (a patched
xen-blkback, or a module for a `--kernel debian` guest): Debian's
linux-headers and linux-kbuild packages of exactly dom0's kernel, fetched
with the host's apt sources (as the dom0 image was) and extracted once into
the cache. No root and no change to the host's apt state: apt runs with
lists and archives of its own in the cache."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from xenlab import progress
from xenlab.build.dom0 import apt_sources, suite_sources
from xenlab.errors import ConfigError, HostError
from xenlab.paths import sweep_stale_work, work_dir
from xenlab.run import CommandError, run

HEADERS_VERSION = "1"  # bump when the extracted layout changes


def _apt_options(state: Path, sources: Path) -> list[str]:
    options = {
        "Dir::Etc::SourceList": sources, "Dir::Etc::SourceParts": state / "no-parts", "Dir::State::Lists": state / "lists",
        "Dir::Cache": state / "cache", "Dir::State::status": "/dev/null", "Debug::NoLocking": "true",
        "APT::Get::List-Cleanup": "false",
    }
    if os.geteuid() == 0:
        options["APT::Sandbox::User"] = "root"  # apt's _apt user cannot write into the cache
    return [arg for key, value in options.items() for arg in ("-o", f"{key}={value}")]


def debian_kernel_dir(release: str, suite: str, cache: Path) -> Path:
    """/usr/src/linux-headers-RELEASE of Debian's packages for `release`
    (dom0's `uname -r`), extracted into `cache` once (whole or not at all)."""
    if not re.fullmatch(r"[\w.+~-]+", release):
        raise ConfigError(f"dom0 kernel release {release!r} is not a Debian kernel's", "a Debian dom0 kernel's release, e.g. 6.1.0-57-amd64")
    final = cache / f"headers-{release}-{HEADERS_VERSION}"
    kernel_dir = final / "usr/src" / f"linux-headers-{release}"
    if (final / ".complete").exists():
        return kernel_dir
    cache.mkdir(parents=True, exist_ok=True)
    sweep_stale_work(cache, ".headers-")
    scratch = work_dir(cache, ".headers-")
    try:
        state = scratch / "apt"
        for sub in ("lists/partial", "cache/archives/partial", "no-parts", "debs"):
            (state / sub).mkdir(parents=True)
        host_sources = apt_sources()
        sources = suite_sources(host_sources, suite, state / f"apt{''.join(host_sources.suffixes) or '.list'}")
        options = _apt_options(state, sources)
        steps = progress.current()
        steps.status(f"apt-get update ({suite}, lists of its own)")
        run(["apt-get", "-q", *options, "update"], timeout=600, hint="check that the host's apt sources work (`apt-get update`)")
        wanted = _packages(options, f"linux-headers-{release}")
        steps.status(f"downloading {', '.join(wanted)}")
        run(["apt-get", "-q", *options, "download", *wanted], cwd=state / "debs", timeout=600)
        root = scratch / "root"
        for deb in sorted((state / "debs").glob("*.deb")):
            run(["dpkg-deb", "-x", deb, root])
        _relocate(root, final, release)
        (root / ".complete").touch()
        try:
            root.rename(final)
        except OSError:
            if not (final / ".complete").exists():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return kernel_dir


def _relocate(root: Path, final: Path, release: str) -> None:
    """Debian's arch Makefile includes the common one by its absolute path
    under /usr/src: point it at the extracted copy (where `root` will be `final`)."""
    makefile = root / "usr/src" / f"linux-headers-{release}" / "Makefile"
    if not makefile.exists():
        raise HostError(f"Debian's headers for {release} have no Makefile after extraction", f"see {root}")
    text = makefile.read_text()
    makefile.write_text(re.sub(r"(?m)^include /usr/src/", f"include {final}/usr/src/", text))


def _packages(options: list[str], headers: str) -> list[str]:
    """headers=VERSION and the linux-headers-*/linux-kbuild-* packages it depends on, each at its exact version."""
    try:
        shown = run(["apt-cache", *options, "show", headers]).stdout.decode()
    except CommandError:
        raise ConfigError(f"no package {headers} in the host's apt sources: dom0's kernel is no longer in the archive",
                          "rebuild dom0 with the archive's current kernel: `xenlab build --force`, then `xenlab up`") from None
    return wanted_packages(shown, headers)


def wanted_packages(shown: str, headers: str) -> list[str]:
    """From `apt-cache show HEADERS`: HEADERS=VERSION and the linux-headers-* and
    linux-kbuild-* packages it depends on, at their exact versions (no compiler)."""
    first = shown.split("\n\n")[0]
    version = re.search(r"^Version: (\S+)", first, re.M)
    depends = re.search(r"^Depends: (.*)$", first, re.M)
    if not version:
        raise HostError(f"apt-cache show {headers} gave no version")
    wanted = [f"{headers}={version.group(1)}"]
    for alternative in (depends.group(1).split(",") if depends else []):
        dep = alternative.split("|")[0].strip()
        match = re.match(r"(linux-(?:headers|kbuild)-\S+)(?:\s*\(=\s*(\S+)\))?", dep)
        if match:
            wanted.append(match.group(1) + (f"={match.group(2)}" if match.group(2) else ""))
    return wanted


def user_kernel_dir(moddir: Path) -> Path:
    """The build directory of a dom0 kernel of the user's: its modules tree's `build` link."""
    build = moddir / "build"
    if (build / "Makefile").exists():
        return build.resolve()
    raise ConfigError(f"{moddir} has no `build` link to the kernel's build directory",
                      "build modules against your dom0 kernel's own build directory: make -C YOUR_BUILD_DIR M=$PWD modules")


def makefile_version(tree: Path) -> str:
    """VERSION.PATCHLEVEL.SUBLEVEL of a kernel tree or build directory (Debian's
    arch headers include the common Makefile, which has them)."""
    text = (tree / "Makefile").read_text(errors="replace")
    included = re.match(r"include (\S+/Makefile)\s*$", text)
    if included:
        text = Path(included.group(1)).read_text(errors="replace")
    parts = [re.search(rf"^{key}\s*=\s*(\d+)", text, re.M) for key in ("VERSION", "PATCHLEVEL", "SUBLEVEL")]
    return ".".join(p.group(1) for p in parts) if all(parts) else ""  # type: ignore[union-attr]
