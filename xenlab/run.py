"""The one wrapper through which every external command runs."""

from __future__ import annotations

import ctypes
import io
import logging
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from xenlab.agent.sysutil import pid_alive as pid_alive  # the one pid_alive; the library's callers import it from here
from xenlab.errors import CommandError

log = logging.getLogger("xenlab.run")

LineCallback = Callable[[str], None]


def pids_using(path: Path) -> list[int]:
    """Processes working in `path`: their command line names it, or their
    root or working directory is in it (a chrooted dpkg, say)."""
    inside = str(path).rstrip("/")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            places = [os.readlink(f"/proc/{entry}/{link}") for link in ("root", "cwd")]
        except OSError:
            places = []
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if inside in cmdline or any(p == inside or p.startswith(inside + "/") for p in places):
            found.append(int(entry))
    return found


def process_age(pid: int) -> float:
    """Seconds since `pid` started (0 when it is gone)."""
    try:
        start_ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


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
    on_line: LineCallback | None = None,
) -> subprocess.CompletedProcess:
    """Run argv, capture output; on failure raise CommandError saying what ran.

    With log_file, stdout and stderr go to that file (long builds) and the
    error quotes its tail and names it. With on_line, every output line (of
    stdout and stderr, without its line ending) is also handed to on_line as
    it arrives, to show live progress; the output is captured or logged the
    same way.
    """
    args = [str(a) for a in argv]
    log.debug("run: %s", shlex.join(args))
    try:
        if log_file is not None:
            with open(log_file, "ab") as out:
                out.write(f"\n$ {shlex.join(args)}\n".encode())
                out.flush()
                proc = _stream(args, input, cwd, timeout, on_line, log_to=out)
            proc.stdout = b""
            proc.stderr = Path(log_file).read_bytes()[-8192:]
        else:
            proc = _stream(args, input, cwd, timeout, on_line)
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


class _LineSink:
    """Hands lines to on_line from one or two reader threads, one at a time."""

    def __init__(self, on_line: LineCallback | None):
        self._on_line: LineCallback | None = on_line
        self._lock = threading.Lock()

    def deliver(self, raw: bytes) -> None:
        # apt, dpkg and friends redraw progress meters with \r: each redraw
        # is a line of its own to the callback.
        parts = [p for p in raw.decode(errors="replace").rstrip("\r\n").split("\r") if p.strip()]
        with self._lock:
            for part in parts:
                if self._on_line is None:
                    return
                try:
                    self._on_line(part)
                except Exception:
                    # Only a display: a broken one must not fail the command,
                    # and the pipe must keep draining or the child blocks.
                    log.warning("on_line callback failed; no more lines go to it", exc_info=True)
                    self._on_line = None


def _pump(pipe: IO[bytes], keep: IO[bytes], sink: _LineSink) -> None:
    for raw in iter(pipe.readline, b""):
        if keep.closed:  # the command was stopped and its log closed; a straggler still writes
            return
        keep.write(raw)
        # Write each line through: a build log is read live (tail -f).
        keep.flush()
        sink.deliver(raw)


_PR_SET_PDEATHSIG = 1
# Looked up here: after fork, in a process that had threads, only
# async-signal-safe work is safe (no dlopen/dlsym).
_prctl = ctypes.CDLL(None, use_errno=True).prctl
# A child stopped on interruption gets this long to clean up (mmdebstrap
# unmounts its chroot's /proc and /sys) before it is killed.
STOP_GRACE_S = 20


def term_when_parent_dies() -> None:
    # Without it a child outlives a SIGKILLed xenlab: mmdebstrap, make or
    # mkfs would go on writing into a work directory nobody owns any more.
    # SIGTERM, not SIGKILL, so that it cleans up as on Ctrl-C.
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the child's whole process group (mmdebstrap only defers it
    while apt and dpkg, its children, go on), then SIGKILL what is left."""
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(proc, signal.SIGKILL)
    proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # its own group, led by it (process_group=0)
    except (ProcessLookupError, PermissionError):
        pass


def _stream(
    args: list[str],
    input: bytes | None,
    cwd: Path | None,
    timeout: float | None,
    on_line: LineCallback | None,
    log_to: IO[bytes] | None = None,
) -> subprocess.CompletedProcess:
    """subprocess.run, reading the output line by line as it comes.

    With log_to, stdout and stderr are merged into it (as without on_line);
    otherwise they are captured apart, as subprocess.run(capture_output=True)."""
    merged = log_to is not None
    stderr = subprocess.STDOUT if merged else subprocess.PIPE
    # No terminal input: a command in a process group of its own would be
    # stopped (SIGTTIN) reading it.
    stdin = subprocess.PIPE if input is not None else subprocess.DEVNULL
    # A group of its own, so that stopping it reaches its children too.
    proc = subprocess.Popen(args, stdin=stdin, stdout=subprocess.PIPE, stderr=stderr, cwd=cwd,
                            process_group=0, preexec_fn=term_when_parent_dies)
    # Popen opened a pipe for each stream given as PIPE: stdout, and stderr unless merged.
    pipes = [p for p in (proc.stdout, proc.stderr) if p is not None]
    captured = [] if merged else [io.BytesIO(), io.BytesIO()]
    outputs = [log_to] if merged else captured
    sink = _LineSink(on_line)
    # Threads, not a select loop: stdin, stdout and stderr must all move at
    # once or a child filling one pipe while we wait on another deadlocks.
    threads = [threading.Thread(target=_pump, args=(p, o, sink), daemon=True) for p, o in zip(pipes, outputs, strict=True)]
    if input is not None:
        threads.append(threading.Thread(target=_feed, args=(proc.stdin, input), daemon=True))
    for t in threads:
        t.start()
    try:
        _wait(proc, threads, timeout)
    except BaseException:
        # A timeout or Ctrl-C does not leave the child running; it may clean up first.
        _stop(proc)
        for t in threads:
            t.join(timeout=5)
        raise
    for p in pipes:
        p.close()
    if merged:
        return subprocess.CompletedProcess(args, proc.returncode, b"", b"")
    return subprocess.CompletedProcess(args, proc.returncode, *(o.getvalue() for o in captured))


def _feed(stdin: IO[bytes], data: bytes) -> None:
    # A child may exit without reading all its input; subprocess.run allows that too.
    try:
        stdin.write(data)
    except BrokenPipeError:
        pass
    try:
        stdin.close()
    except BrokenPipeError:
        pass


def _wait(proc: subprocess.Popen, threads: list[threading.Thread], timeout: float | None) -> None:
    """Wait for the child and for its output to end, all within timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    proc.wait(timeout=timeout)
    for t in threads:
        t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if t.is_alive():  # a grandchild still holds the pipe open
            assert timeout is not None  # join(None) returns only once the thread has ended
            raise subprocess.TimeoutExpired(proc.args, timeout)
