"""Where xenlab keeps its image cache and per-lab state, and where its own
resources (default config, templates, guest kernel fragment) are: inside
the package, so a wheel installed anywhere finds them."""

import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from xenlab.run import pid_alive, pids_using

# setuptools installs packages as plain directories (no zip), so the
# package's data folder is a real path that jinja2 and file APIs can use.
DATA_DIR = Path(str(resources.files("xenlab") / "data"))
DEFAULT_CONFIG = DATA_DIR / "default.toml"
TEMPLATES_DIR = DATA_DIR / "templates"
GUEST_KERNEL_DIR = DATA_DIR / "guest-kernel"


def private(path: Path) -> Path:
    """`path` as a directory only its owner can enter (0700): the image cache
    holds dom0's SSH host key and the state directories the labs' SSH keys,
    so nothing below them may be readable by other users."""
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        path.chmod(mode & 0o700)
    return path


def cache_base() -> Path:
    """Where the image cache is (nothing created)."""
    return Path(os.environ.get("XENLAB_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xenlab")


def state_base() -> Path:
    """Where the labs' state is (nothing created)."""
    return Path(os.environ.get("XENLAB_STATE") or Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "xenlab")


SYSTEM_STACKS = Path("/opt/xenlab/stacks")


def stack_dirs() -> list[Path]:
    """Where QEMU stacks installed beside Debian's are found, in order:
    $XENLAB_STACKS, the user's cache, and the place for every user that
    ci/setup-host.sh installs to as root (ci/qemu-backports.sh uses these)."""
    given = os.environ.get("XENLAB_STACKS")
    return ([Path(given)] if given else []) + [cache_base() / "stacks", SYSTEM_STACKS]


QEMU_STACKS = ("stock", "backports")  # the names `[lab] qemu` takes besides a path
BACKPORTS_INSTALL = "bash ci/qemu-backports.sh (ci/setup-host.sh runs it)"


def backports_qemu() -> str:
    """The QEMU from bookworm-backports that ci/qemu-backports.sh installed (its wrapper), or ''."""
    for stacks in stack_dirs():
        wrapper = stacks / "qemu-backports" / "qemu-system-x86_64"
        if wrapper.is_file() and os.access(wrapper, os.X_OK):
            return str(wrapper)
    return ""


def cache_dir() -> Path:
    return private(cache_base())


def state_root() -> Path:
    private(state_base())
    return private(state_base() / "labs")


def lab_dir(name: str) -> Path:
    return state_root() / name


OWNER_FILE = ".owner"


def work_dir(parent: Path, prefix: str) -> Path:
    """A new private scratch directory in `parent` for an entry being built,
    marked with this process's pid so that a later build can tell it is
    stale once that process is gone (killed with SIGKILL, say)."""
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    (work / OWNER_FILE).write_text(f"{os.getpid()}\n")
    return work


def sweep_stale_work(parent: Path, prefix: str) -> list[str]:
    """Remove the scratch directories in `parent` whose builder is gone;
    returns one line per directory removed or, when something is still
    mounted below it, left alone."""
    said = []
    mounts = _mount_points()
    for work in sorted(parent.glob(f"{prefix}*")):
        try:
            pid = int((work / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not ours, or still being made
        if pid_alive(pid):
            continue
        users = pids_using(work)
        if users:  # a child of the killed build, still finishing or cleaning up
            said.append(f"left {work}: its builder (pid {pid}) is gone but pid {users[0]} still works in it")
            continue
        inside = [m for m in mounts if m.startswith(f"{work}/")]
        if inside:
            said.append(f"left {work}: its builder (pid {pid}) is gone but {inside[0]} is still mounted; unmount it and remove the directory")
            continue
        shutil.rmtree(work, ignore_errors=True)
        said.append(f"removed {work}, left by an interrupted build (pid {pid})")
    return said


def _mount_points() -> list[str]:
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return []
    # Mount points escape spaces and the like as octal (\040).
    return [line.split()[1].encode().decode("unicode_escape") for line in lines if len(line.split()) > 1]
