"""The one wrapper through which every external command runs."""

from __future__ import annotations

import logging
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

from xenlab.errors import CommandError

log = logging.getLogger("xenlab.run")


def tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run(
    argv: Sequence[str | Path],
    *,
    check: bool = True,
    input: bytes | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
    log_file: Path | None = None,
    hint: str = "",
) -> subprocess.CompletedProcess:
    """Run argv, capture output; on failure raise CommandError saying what ran.

    With log_file, stdout and stderr go to that file (long builds) and the
    error quotes its tail and names it.
    """
    args = [str(a) for a in argv]
    log.debug("run: %s", shlex.join(args))
    try:
        if log_file is not None:
            with open(log_file, "ab") as out:
                out.write(f"\n$ {shlex.join(args)}\n".encode())
                out.flush()
                proc = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, input=input, cwd=cwd, timeout=timeout)
            proc.stdout = b""
            proc.stderr = Path(log_file).read_bytes()[-8192:]
        else:
            proc = subprocess.run(args, capture_output=True, input=input, cwd=cwd, timeout=timeout)
    except FileNotFoundError:
        raise CommandError(
            f"command not found: {args[0]}",
            hint or "run `xenlab doctor` to see which host packages are missing (ci/setup-host.sh installs them)",
        ) from None
    except subprocess.TimeoutExpired:
        raise CommandError(f"command timed out after {timeout} s: {shlex.join(args)}", hint) from None
    if check and proc.returncode != 0:
        err = proc.stderr.decode(errors="replace") if isinstance(proc.stderr, bytes) else str(proc.stderr)
        where = f" (full log: {log_file})" if log_file else ""
        raise CommandError(
            f"command failed with exit code {proc.returncode}: {shlex.join(args)}{where}\n{tail(err)}",
            hint,
        )
    return proc
