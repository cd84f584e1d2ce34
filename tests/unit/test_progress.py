"""Live progress of long steps: the text, the throttling for logs (CI), the
terminal line, and the ambient Steps that deep code reports through."""

import io

from rich.console import Console

from xenlab import progress
from xenlab.progress import LineCount, Steps, Throttle, describe


def console(terminal: bool = False) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=terminal, width=100, highlight=False, color_system=None), out


def test_describe_with_and_without_total():
    assert describe(812, 1460, "compiled", "files") == ("compiled 812/1460 files (55%)", 100 * 812 / 1460)
    assert describe(3, None, "configuring:", "packages set up") == ("configuring: 3 packages set up", None)
    assert describe(7) == ("7", None)


def test_describe_never_shows_more_than_100_percent():
    assert describe(1460, 1460, "compiled", "files")[0] == "compiled 1460/1460 files (100%)"
    assert describe(1461, 1460, "compiled", "files") == ("compiled 1461 files", None)
    assert describe(1459, 1460)[0] == "1459/1460 (99%)"  # rounded down: 100% only when done


def test_throttle_first_line_then_one_per_tenth_at_most_every_10_s():
    t = Throttle(every_s=10, heartbeat_s=60)
    assert t.due(0, 1.0)
    assert not t.due(5, 30.0)  # a new tenth, but too soon
    assert t.due(10, 30.0)
    assert not t.due(25, 39.0)  # same tenth, no heartbeat yet
    assert t.due(26, 40.0)
    assert t.due(86, 45.0)  # same tenth, but a minute passed


def test_throttle_without_total_is_every_10_s():
    t = Throttle(every_s=10)
    assert [t.due(now, None) for now in (0, 3, 9.9, 10, 12, 20.5)] == [True, False, False, True, False, True]


def test_log_progress_is_short_and_ends_with_the_last_state():
    out_console, out = console(terminal=False)
    steps = Steps(out=out_console)
    with steps.step("make bzImage"):
        for done in range(1, 1001):
            steps.progress(done, 1000, "compiled", "files")
    lines = out.getvalue().splitlines()
    assert lines[0] == "> make bzImage ..."
    # Called 1000 times within well under 10 s: the first state and the last.
    assert lines[1:3] == ["    compiled 1/1000 files (0%)", "    compiled 1000/1000 files (100%)"]
    assert lines[3].startswith("ok make bzImage (")
    assert steps.timings["make bzImage"] >= 0


def test_status_is_printed_at_once_and_once():
    out_console, out = console()
    steps = Steps(out=out_console)
    with steps.step("mkfs"):
        steps.status("writing 700 MiB into rootfs.img")
        steps.status("writing 700 MiB into rootfs.img")
        steps.status("syncing")
    assert out.getvalue().splitlines()[1:3] == ["    writing 700 MiB into rootfs.img", "    syncing"]


def test_progress_of_a_failed_step_ends_before_the_failure_line():
    out_console, out = console()
    steps = Steps(out=out_console)
    try:
        with steps.step("mmdebstrap"):
            steps.progress(5, None, "unpacking:", "packages unpacked")
            steps.progress(6, None, "unpacking:", "packages unpacked")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    lines = out.getvalue().splitlines()
    assert lines[1:3] == ["    unpacking: 5 packages unpacked", "    unpacking: 6 packages unpacked"]
    assert lines[3].startswith("x mmdebstrap failed after")


def test_a_child_step_ends_its_parents_progress_line():
    out_console, out = console()
    steps = Steps(out=out_console)
    with steps.step("build"):
        steps.progress(1, 2, "did")
        steps.progress(2, 2, "did")
        with steps.step("child"):
            pass
    lines = out.getvalue().splitlines()
    assert lines[1:4] == ["    did 1/2 (50%)", "    did 2/2 (100%)", "  > child ..."]


def test_quiet_steps_print_nothing():
    out_console, out = console(terminal=True)
    steps = Steps(quiet=True, out=out_console)
    with steps.step("x"):
        steps.progress(1, 2, "did")
        steps.status("busy")
        steps.note("note")
    assert out.getvalue() == ""


def test_terminal_line_is_redrawn_in_place_and_left_as_a_note():
    out_console, out = console(terminal=True)
    steps = Steps(out=out_console)
    with steps.step("make bzImage"):
        steps.progress(1, 3, "compiled", "files")
        steps.status("linking")  # forced: drawn at once, although within 0.1 s
    text = out.getvalue()
    assert "\r" in text  # redrawn over itself (rich Live), not printed line after line
    # Left behind: the last state as a plain line, then the ok line.
    assert text.rstrip().splitlines()[-2:][0].endswith("    linking")
    assert "ok make bzImage" in text.rstrip().splitlines()[-1]


def test_current_is_the_innermost_running_steps():
    out_console, _ = console()
    steps = Steps(out=out_console)
    assert progress.current().quiet and progress.current() is not steps
    with steps.step("outer"):
        assert progress.current() is steps
        inner = Steps(quiet=True)
        with inner.step("inner"):
            assert progress.current() is inner
        assert progress.current() is steps
    assert progress.current() is not steps


def test_line_count_counts_kbuild_compiles():
    out_console, out = console()
    steps = Steps(out=out_console)
    with steps.step("make bzImage"):
        count = LineCount(steps, r"^\s+CC\s", 3, "compiled", "files")
        for line in ("  SYNC    include/config/auto.conf", "  HOSTCC  scripts/basic/fixdep", "  CC      kernel/fork.o",
                     "  AR      kernel/built-in.a", "  CC      mm/slub.o", "  LD      vmlinux.o", "  CC      init/main.o"):
            count(line)
    assert count.count == 3
    assert "    compiled 3/3 files (100%)" in out.getvalue().splitlines()
