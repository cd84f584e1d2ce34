"""run() with on_line: each output line reaches the callback as it comes,
and everything else run() does stays as it was."""

import sys

import pytest

from xenlab.errors import CommandError
from xenlab.run import run

BOTH = ["sh", "-c", "echo a; echo b >&2"]


def test_on_line_gets_stdout_and_stderr_and_output_is_still_captured():
    lines = []
    proc = run(BOTH, on_line=lines.append)
    assert sorted(lines) == ["a", "b"]
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"a\n", b"b\n")


def test_on_line_with_log_file_logs_everything_and_returns_its_tail(tmp_path):
    log, lines = tmp_path / "build.log", []
    proc = run(BOTH, log_file=log, on_line=lines.append)
    assert sorted(lines) == ["a", "b"]
    text = log.read_text()
    assert text.startswith("\n$ sh -c 'echo a; echo b >&2'\n") and "a\n" in text and "b\n" in text
    assert proc.stdout == b"" and proc.stderr == log.read_bytes()


def test_lines_arrive_while_the_command_runs(tmp_path):
    # The second line is only printed once the first was seen: a callback
    # that got lines only at the end would deadlock here (timeout).
    seen = tmp_path / "seen"
    script = f"echo first; while [ ! -e {seen} ]; do sleep 0.05; done; echo second"
    lines = []
    run(["sh", "-c", script], timeout=10, on_line=lambda line: (lines.append(line), seen.touch()))
    assert lines == ["first", "second"]


def test_carriage_return_redraws_are_lines_of_their_own():
    lines = []
    run(["printf", r"10%%\r50%%\rdone\n\n"], on_line=lines.append)
    assert lines == ["10%", "50%", "done"]


def test_input_is_fed():
    lines = []
    proc = run(["cat"], input=b"x\ny\n", on_line=lines.append)
    assert lines == ["x", "y"] and proc.stdout == b"x\ny\n"


def test_failure_quotes_the_log_tail(tmp_path):
    log = tmp_path / "build.log"
    with pytest.raises(CommandError, match=r"exit code 3: sh -c .*\(full log: .*build.log\)\n(.|\n)*oops"):
        run(["sh", "-c", "echo oops >&2; exit 3"], log_file=log, on_line=lambda line: None)


def test_failure_without_log_quotes_stderr():
    with pytest.raises(CommandError, match=r"exit code 3: .*\nbad$"):
        run(["sh", "-c", "echo fine; echo bad >&2; exit 3"], on_line=lambda line: None)


def test_check_false_returns_the_exit_code():
    assert run(["sh", "-c", "exit 2"], check=False, on_line=lambda line: None).returncode == 2


def test_timeout_kills_and_says_so():
    with pytest.raises(CommandError, match=r"timed out after 0.3 s"):
        run(["sleep", "5"], timeout=0.3, on_line=lambda line: None)


def test_missing_command():
    with pytest.raises(CommandError, match="command not found: no-such-command-xenlab"):
        run(["no-such-command-xenlab"], on_line=lambda line: None)


def test_a_failing_callback_does_not_fail_or_stall_the_command():
    def broken(line):
        raise ValueError(line)

    # More output than a pipe holds: the reader must keep draining.
    proc = run([sys.executable, "-c", "for i in range(20000): print(i)"], on_line=broken)
    assert proc.stdout.count(b"\n") == 20000
