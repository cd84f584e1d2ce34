"""`xenlab cp`: files between the host and dom0 or a guest, as scp does
(content and mode kept; a directory as destination takes the source's name).
dom0 is reached over SFTP, a guest over its console exec channel, so guests
without a network work too."""

from __future__ import annotations

import base64
import gzip
import os
import posixpath
import shlex
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from xenlab.config import validate_name
from xenlab.dom0 import Dom0
from xenlab.errors import ConfigError, XenlabError
from xenlab.guest.manager import Guests
from xenlab.lab.ssh import CommandResult


class CopyError(XenlabError):
    """The copy failed on one side (a missing file, a directory, no permission)."""


@dataclass(frozen=True)
class Endpoint:
    where: str  # "host", "dom0" or a guest's name
    path: str

    def __str__(self) -> str:
        return self.path if self.where == "host" else f"{self.where}:{self.path}"


def parse(text: str) -> Endpoint:
    """'dom0:PATH', 'GUEST:PATH', or a host path (a colon after a slash is part of a host path, as in scp)."""
    head, sep, rest = text.partition(":")
    if not sep or "/" in head or not head:
        return Endpoint("host", text)
    if head != "dom0":
        validate_name(head, "guest name")
    if not rest:
        raise ConfigError(f"{text!r} names no path", f"write {head}:/path/in/{head}")
    return Endpoint(head, rest)


def _host_read(path: str) -> tuple[bytes, int]:
    p = Path(path)
    if not p.exists():
        raise CopyError(f"{path}: No such file or directory")
    if not p.is_file():
        raise CopyError(f"{path}: not a regular file", "xenlab cp copies files, not directories")
    return p.read_bytes(), stat.S_IMODE(p.stat().st_mode)


def _host_write(path: str, name: str, data: bytes, mode: int) -> str:
    target = Path(path) / name if Path(path).is_dir() else Path(path)
    if not target.parent.is_dir():
        raise CopyError(f"{target}: No such file or directory (the directory {target.parent} does not exist)")
    target.write_bytes(data)
    os.chmod(target, mode)
    return str(target)


def _remote_read(run, where: str, path: str) -> tuple[bytes, int]:
    """`run(command, input) -> CommandResult` on dom0 or in a guest: mode and content (base64: the console carries text)."""
    q = shlex.quote(path)
    result = run(f"if [ -f {q} ]; then stat -c %a {q} && base64 {q}; elif [ -e {q} ]; then echo 'not a regular file' >&2; exit 2; "
                 f"else echo 'No such file or directory' >&2; exit 1; fi", b"")
    if not result.ok:
        raise CopyError(f"{where}:{path}: {result.stderr.strip() or f'exit {result.exit_status}'}")
    mode, _, body = result.stdout.partition("\n")
    return base64.b64decode(body), int(mode.strip(), 8)


def _remote_write(run, where: str, path: str, name: str, data: bytes, mode: int, packed: bool = False) -> str:
    """`run(command, input)` on dom0 or in a guest: one round trip that finds
    the target (PATH, or PATH/NAME when PATH is a directory), writes and chmods it.
    packed: the data goes gzipped when that makes it smaller (a guest's console
    carries about 25 KB/s of base64; dom0's SSH needs no help)."""
    reader = "cat"
    if packed and len(data) > 512:
        smaller = gzip.compress(data, compresslevel=6, mtime=0)
        if len(smaller) < len(data) * 0.9:
            data, reader = smaller, "zcat"
    script = (f"p={shlex.quote(path)}; if [ -d \"$p\" ]; then t=\"$p\"/{shlex.quote(name)}; "
              "elif [ -d \"$(dirname \"$p\")\" ]; then t=\"$p\"; "
              "else echo 'No such file or directory (its directory does not exist)' >&2; exit 3; fi; "
              f"{reader} > \"$t\" && chmod {mode:o} \"$t\" && echo \"$t\"")
    result = run(script, data)
    if not result.ok:
        raise CopyError(f"{where}:{path}: {result.stderr.strip() or f'exit {result.exit_status}'}")
    return result.stdout.strip().splitlines()[-1]


def copy(lab, src: str, dest: str) -> dict:
    """Copy one file; what was copied, how many bytes, and the mode kept."""
    a, b = parse(src), parse(dest)
    if (a.where == "host") == (b.where == "host"):
        raise ConfigError(f"xenlab cp {src} {dest}: one side must be on this host and the other dom0:PATH or GUEST:PATH",
                          "copy between two lab machines through the host")
    remote = a if a.where != "host" else b
    # dom0's run and a guest's exec differ past the command and its input; only those are passed.
    run: Callable[[str, bytes], CommandResult]
    with Dom0(lab) as dom0, Guests(lab) as guests:
        if remote.where == "dom0":
            def run(command: str, data: bytes) -> CommandResult:
                return dom0.run(command, input=data, timeout=600)
        else:
            def run(command: str, data: bytes) -> CommandResult:
                return guests.exec(remote.where, command, input=data, timeout=600)
        if a.where == "host":
            data, mode = _host_read(a.path)
            written = _remote_write(run, b.where, b.path, Path(a.path).name, data, mode, packed=b.where != "dom0")
            target = f"{b.where}:{written}"
        else:
            data, mode = _remote_read(run, a.where, a.path)
            target = _host_write(b.path, posixpath.basename(a.path), data, mode)
    return {"source": str(a), "destination": target, "bytes": len(data), "mode": f"{mode:04o}"}
