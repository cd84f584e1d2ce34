"""Where xenlab keeps its image cache and per-lab state."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS_DIR = REPO_ROOT / "configs"
TEMPLATES_DIR = CONFIGS_DIR / "templates"


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
