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


def cache_dir() -> Path:
    base = os.environ.get("XENLAB_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xenlab"
    return Path(base)


def state_root() -> Path:
    base = os.environ.get("XENLAB_STATE") or Path(
        os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    ) / "xenlab"
    return Path(base) / "labs"


def lab_dir(name: str) -> Path:
    return state_root() / name
