"""Timed, nested steps shown on stderr, with their durations kept for reports."""

from __future__ import annotations

import time
from contextlib import contextmanager

from rich.console import Console

console = Console(stderr=True, highlight=False, soft_wrap=True)


class Steps:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.timings: dict[str, float] = {}
        self._depth = 0

    @contextmanager
    def step(self, title: str):
        indent = "  " * self._depth
        if not self.quiet:
            console.print(f"{indent}[cyan]>[/] {title} ...")
        start = time.monotonic()
        self._depth += 1
        try:
            yield
        except BaseException:
            if not self.quiet:
                console.print(f"{indent}[red]x[/] {title} failed after {time.monotonic() - start:.1f} s")
            raise
        finally:
            self._depth -= 1
        took = time.monotonic() - start
        self.timings[title] = round(took, 2)
        if not self.quiet:
            console.print(f"{indent}[green]ok[/] {title} ({took:.1f} s)")

    def note(self, text: str) -> None:
        if not self.quiet:
            console.print("  " * self._depth + f"  {text}")
