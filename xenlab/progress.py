"""Timed, nested steps shown on stderr, with their durations kept for reports.

A long step also shows live progress (`Steps.progress`): one redrawn line on
a terminal, a few throttled lines in a log (CI)."""

from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar

from rich.console import Console
from rich.errors import LiveError
from rich.live import Live
from rich.text import Text

console = Console(stderr=True, highlight=False, soft_wrap=True)


class Steps:
    def __init__(self, quiet: bool = False, out: Console | None = None):
        self.quiet = quiet
        self.timings: dict[str, float] = {}
        self._depth = 0
        self._out = out or console
        self._lock = threading.RLock()  # progress may come from a watcher thread
        self._line: _TerminalLine | _LogLine | None = None

    @contextmanager
    def step(self, title: str):
        indent = "  " * self._depth
        self._end_line()  # a parent's progress line stops where a child step starts
        if not self.quiet:
            self._out.print(f"{indent}[cyan]>[/] {title} ...")
        start = time.monotonic()
        self._depth += 1
        token = _current.set(self)
        try:
            yield
        except BaseException:
            self._end_line()
            if not self.quiet:
                self._out.print(f"{indent}[red]x[/] {title} failed after {time.monotonic() - start:.1f} s")
            raise
        finally:
            self._depth -= 1
            _current.reset(token)
        self._end_line()
        took = time.monotonic() - start
        self.timings[title] = round(took, 2)
        if not self.quiet:
            self._out.print(f"{indent}[green]ok[/] {title} ({took:.1f} s)")

    def note(self, text: str) -> None:
        if not self.quiet:
            self._out.print("  " * self._depth + f"  {text}")

    def progress(self, done: int, total: int | None = None, detail: str = "", unit: str = "") -> None:
        """How far the running step is, e.g. progress(812, 1460, "compiled", "files")
        shows "compiled 812/1460 files (55%)". Call it as often as you like:
        the display throttles itself."""
        text, pct = describe(done, total, detail, unit)
        self._show(text, pct, force=False)

    def status(self, text: str) -> None:
        """What the running step is doing now, without a count ("writing
        rootfs.img (1.1 GiB)"); shown at once, also in a log."""
        self._show(text, None, force=True)

    def _show(self, text: str, pct: float | None, force: bool) -> None:
        if self.quiet:
            return
        with self._lock:
            if self._line is None:
                kind = _TerminalLine if self._out.is_terminal else _LogLine
                self._line = kind(self._out, "  " * self._depth)
            self._line.update(text, pct, time.monotonic(), force)

    def _end_line(self) -> None:
        with self._lock:
            if self._line is not None:
                self._line.end()
                self._line = None


def describe(done: int, total: int | None = None, detail: str = "", unit: str = "") -> tuple[str, float | None]:
    """The progress text and its percentage (None without a usable total).

    A total is often an estimate: past it only the count is shown, never
    more than 100 %."""
    unit = f" {unit}" if unit else ""
    if total and 0 <= done <= total:
        pct = 100.0 * done / total
        count = f"{done}/{total}{unit} ({int(pct)}%)"
    else:
        pct, count = None, f"{done}{unit}"
    return (f"{detail} {count}" if detail else count), pct


class Throttle:
    """When a log that is not a terminal gets another progress line.

    At most one line every `every_s` seconds and, with a total, only once the
    percentage reached another tenth (or `heartbeat_s` passed): a 5-minute
    build leaves about ten lines in a CI log, not thousands."""

    def __init__(self, every_s: float = 10.0, heartbeat_s: float = 60.0):
        self.every_s = every_s
        self.heartbeat_s = heartbeat_s
        self._last: float | None = None
        self._tenth: int | None = None

    def due(self, now: float, pct: float | None) -> bool:
        tenth = None if pct is None else int(pct // 10)
        if self._last is not None:
            waited = now - self._last
            if waited < self.every_s:
                return False
            if tenth is not None and tenth == self._tenth and waited < self.heartbeat_s:
                return False
        self.mark(now, pct)
        return True

    def mark(self, now: float, pct: float | None) -> None:
        """A line was printed now (also one forced out of turn)."""
        self._last, self._tenth = now, None if pct is None else int(pct // 10)


class _LogLine:
    """Progress in a log: throttled lines, and the last state at the end."""

    def __init__(self, out: Console, indent: str):
        self._out, self._indent = out, indent
        self._throttle = Throttle()
        self._text = ""
        self._printed = ""

    def update(self, text: str, pct: float | None, now: float, force: bool) -> None:
        self._text = text
        if force and text != self._printed:
            self._throttle.mark(now, pct)
            self._print()
        elif self._throttle.due(now, pct):
            self._print()

    def end(self) -> None:
        if self._text != self._printed:
            self._print()

    def _print(self) -> None:
        self._out.print(f"{self._indent}  {self._text}", markup=False)
        self._printed = self._text


class _TerminalLine:
    """Progress on a terminal: one line redrawn in place (at most 10 times a
    second: kbuild prints hundreds of lines a second), then left as a note."""

    REDRAW_S = 0.1

    def __init__(self, out: Console, indent: str):
        self._out, self._indent = out, indent
        self._live: Live | None = None
        self._broken = False
        self._drawn_at = float("-inf")
        self._text = ""

    def update(self, text: str, pct: float | None, now: float, force: bool) -> None:
        self._text = text
        if self._broken or (not force and now - self._drawn_at < self.REDRAW_S):
            return
        self._drawn_at = now
        line = Text(f"{self._indent}  {text}", style="dim", no_wrap=True, overflow="ellipsis")
        if self._live is not None:
            self._live.update(line, refresh=True)
            return
        # No redirection of sys.stdout/stderr: that would reach into code
        # that is not ours for as long as the line is up.
        self._live = Live(line, console=self._out, transient=True, auto_refresh=False, redirect_stdout=False, redirect_stderr=False)
        try:
            self._live.start(refresh=True)
        except LiveError:  # another live display (another Steps) has the terminal
            self._live, self._broken = None, True

    def end(self) -> None:
        if self._live is not None:
            self._live.stop()
        if self._text:
            self._out.print(f"{self._indent}  {self._text}", markup=False)


class LineCount:
    """An on_line callback for run(): counts the output lines that match
    `pattern` and shows the count as the running step's progress (kbuild's
    "  CC      kernel/fork.o" lines as files compiled)."""

    def __init__(self, steps: Steps, pattern: str, total: int | None = None, detail: str = "", unit: str = ""):
        self._steps = steps
        self._pattern = re.compile(pattern)
        self.total, self.detail, self.unit = total, detail, unit
        self.count = 0

    def __call__(self, line: str) -> None:
        if self._pattern.search(line):
            self.count += 1
            self._steps.progress(self.count, self.total, self.detail, self.unit)


_current: ContextVar[Steps | None] = ContextVar("xenlab_current_steps", default=None)


def current() -> Steps:
    """The Steps whose step runs here (innermost), else a quiet one.

    Code deep under a step (the guest kernel build) reports progress through
    it without a Steps parameter in every signature on the way."""
    return _current.get() or Steps(quiet=True)
