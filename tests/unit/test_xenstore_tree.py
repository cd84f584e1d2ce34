"""xenstore-ls formatting (checked byte for byte against dom0's xenstore-ls
in tests/e2e/test_xenstore.py), paths and permissions parsing, CLI input errors."""

import pytest
from click.testing import CliRunner

from xenlab.cli import main
from xenlab.errors import XenStoreError
from xenlab.xenstore.paths import Perm, check_path, check_value, parse_perms
from xenlab.xenstore.tree import ls_lines, sanitise

from .test_xenstore_fake import FakeXenstored


def test_sanitise_matches_xenstore_ls_quoting():
    assert sanitise('plain "quoted" ~') == 'plain "quoted" ~'
    assert sanitise("a\tb\nc\rd\\e") == "a\\tb\\nc\\rd\\\\e"
    assert sanitise("\x00\x01\x07") == "\\000\\001\\007"  # below 010: octal
    assert sanitise("\x08\x1f\x7f") == "\\x08\\x1f\\x7f"
    assert sanitise("é") == "\\xc3\\xa9"  # bytes, not characters


@pytest.fixture
def store():
    fake = FakeXenstored()
    fake.nodes.update({
        "/local": b"", "/local/domain": b"", "/local/domain/0": b"", "/local/domain/0/name": b"Domain-0",
        "/t": b"", "/t/long": b"x" * 120, "/t/tab": b"a\tb",
    })
    xs = fake.store()
    yield xs
    xs.close()
    fake.kill()


def test_ls_full_paths(store):
    assert ls_lines(store, "/t", full=True) == ['/t/long = "' + "x" * 120 + '"', '/t/tab = "a\\tb"']
    assert ls_lines(store, "/local", full=True)[-1] == '/local/domain/0/name = "Domain-0"'


def test_ls_tree_truncates_at_80_columns_like_xenstore_ls(store):
    lines = ls_lines(store, "/", full=False)
    assert " domain = \"\"" in lines and "   name = \"Domain-0\"" in lines
    long_line = next(line for line in lines if line.startswith(" long"))
    assert long_line == ' long = "' + "x" * (80 - 8 - 5) + '\\..."'


def test_ls_missing_path_names_it(store):
    with pytest.raises(XenStoreError, match="ls /nope: ENOENT"):
        ls_lines(store, "/nope")


def test_paths_and_values():
    assert check_path("/local/domain/0/backend/vbd/1/51712") and check_path("data/x") and check_path("/a/@b")
    assert check_path("@releaseDomain", watch=True)
    with pytest.raises(XenStoreError, match="only the watch paths"):
        check_path("@releaseDomain")
    with pytest.raises(XenStoreError, match="ends with '/'"):
        check_path("/a/")
    with pytest.raises(XenStoreError, match="contains ' '"):
        check_path("/a b")
    assert check_value("/a", "x" * 4093) and check_value("/a", b"\x00\xff")
    with pytest.raises(XenStoreError, match="value for /a is 4094 bytes"):
        check_value("/a", "x" * 4094)


def test_perms_parse():
    assert parse_perms(["n0", "r5", "b12", "w3"]) == [Perm("n", 0), Perm("r", 5), Perm("b", 12), Perm("w", 3)]
    for bad in ("x0", "r", "r-1", "0n", "r 1"):
        with pytest.raises(XenStoreError, match="invalid XenStore permission"):
            parse_perms([bad])


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_cli_lists_xs_and_trace():
    out = run("--help").output
    assert "xs " in out and "trace" in out
    out = run("xs", "--help").output
    for cmd in ("ls", "read", "write", "rm", "mkdir", "perms", "watch", "dump"):
        assert cmd in out


@pytest.mark.parametrize("args, message", [
    (["xs", "read", "/a b"], "invalid XenStore path '/a b'"),
    (["xs", "write", "/a", "1", "/b"], "takes PATH VALUE pairs"),
    (["xs", "perms", "/a", "q7"], "invalid XenStore permission 'q7'"),
    (["xs", "ls", "/a//b"], "contains '//'"),
    (["xs", "watch", "@nothing"], "only the watch paths"),
    (["xs", "read", "/a", "--timeout", "0"], "--timeout must be positive"),
])
def test_cli_bad_input_fails_before_connecting(args, message, tmp_path, monkeypatch):
    monkeypatch.setenv("XENLAB_STATE", str(tmp_path))  # no lab: must fail on the input, not on SSH
    result = run(*args, "--name", "nolab")
    assert result.exit_code != 0 and message in result.output, result.output


def test_cli_lab_down_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XENLAB_STATE", str(tmp_path))
    result = run("xs", "read", "/local/domain/0/name", "--name", "nolab")
    assert result.exit_code == 1 and "lab 'nolab' is not up" in result.output
