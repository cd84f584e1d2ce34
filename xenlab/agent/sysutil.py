"""Small OS helpers shared by the agent (in dom0 and domUs) and the host
library: standard library only, like the rest of the agent."""

from __future__ import annotations

import os
import tempfile


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not: a daemonized QEMU's parent is
    init, which may take seconds to reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        # Reaped since the signal went: gone. Only without a procfs does the signal's answer stand.
        return not os.path.exists("/proc/self")
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        current = os.umask(0o022)
        os.umask(current)
        return current


def atomic_write(path: str | os.PathLike, data: bytes | str, mode: int | None = None) -> None:
    """Write `path` whole or not at all: a reader never sees half a file, and
    two writers at once each use a temporary name of their own (the last
    rename wins) instead of sharing one fixed `.part` name. The file gets
    `mode`, else what open() would give it (0666 less the umask)."""
    path = os.fspath(path)
    directory, name = os.path.split(path)
    fd, part = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=directory or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(part, mode if mode is not None else 0o666 & ~_umask())
        os.replace(part, path)
    except BaseException:
        try:
            os.unlink(part)
        except FileNotFoundError:
            pass
        raise
