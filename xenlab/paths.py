"""Where xenlab keeps its image cache and per-lab state, and where its own
resources (default config, templates, guest kernel fragment) are: inside
the package, so a wheel installed anywhere finds them."""

import os
from importlib import resources
from pathlib import Path

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


def cache_dir() -> Path:
    return private(cache_base())


def state_root() -> Path:
    private(state_base())
    return private(state_base() / "labs")


def lab_dir(name: str) -> Path:
    return state_root() / name
