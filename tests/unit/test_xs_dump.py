"""`xs dump` and `xs dump --diff`: the diff, its text form, the dump file
checks, and the CLI refusing a bad FILE before it connects to any lab."""

import json

import pytest
from click.testing import CliRunner

from xenlab.cli import main
from xenlab.errors import ConfigError
from xenlab.xenstore import dumps

from .test_xenstore_fake import FakeXenstored


def node(value, *perms):
    return {"value": value, "perms": list(perms or ("n0",))}


BEFORE = {
    "/": node(""),
    "/local/domain/0/name": node("Domain-0"),
    "/local/domain/2/name": node("g1"),
    "/local/domain/2/device/vbd/51712/state": node("1", "n2", "r0"),
    "/local/domain/10/name": node("g2"),
}


def test_no_changes():
    changes = dumps.diff(BEFORE, json.loads(json.dumps(BEFORE)))
    assert changes == {"added": [], "removed": [], "changed": [], "perms": []}
    assert dumps.format_diff(changes) == [] and dumps.summary(changes) == "no changes"


def test_added_removed_changed_and_perms_told_apart():
    after = {k: dict(v) for k, v in BEFORE.items() if k != "/local/domain/10/name"}
    after["/local/domain/2/device/vbd/51712/state"] = node("4", "n2", "r0")
    after["/local/domain/2/name"] = node("g1", "n2", "r0")
    after["/local/domain/0/backend/vbd/2/51712/state"] = node("4", "n0", "r2")
    changes = dumps.diff(BEFORE, after)
    assert changes["added"] == [{"path": "/local/domain/0/backend/vbd/2/51712/state", "value": "4", "perms": ["n0", "r2"]}]
    assert changes["removed"] == [{"path": "/local/domain/10/name", "value": "g2", "perms": ["n0"]}]
    assert changes["changed"] == [{"path": "/local/domain/2/device/vbd/51712/state", "old": "1", "new": "4"}]
    assert changes["perms"] == [{"path": "/local/domain/2/name", "old": ["n0"], "new": ["n2", "r0"]}]
    assert dumps.format_diff(changes) == [
        '+ /local/domain/0/backend/vbd/2/51712/state = "4"',
        '~ /local/domain/2/device/vbd/51712/state: "1" -> "4"',
        "~ /local/domain/2/name perms: n0 -> n2 r0",
        "- /local/domain/10/name",
    ]
    assert dumps.summary(changes) == "1 added, 1 removed, 1 changed, 1 with new permissions"


def test_value_and_perms_of_one_node_are_two_lines_value_first():
    changes = dumps.diff({"/a": node("1")}, {"/a": node("2", "b0")})
    assert dumps.format_diff(changes) == ['~ /a: "1" -> "2"', "~ /a perms: n0 -> b0"]


def test_sorted_by_component_numbers_as_numbers():
    after = {f"/local/domain/{n}": node("") for n in (10, 2, 1)} | {"/a-b": node(""), "/a/b": node(""), "/a": node("")}
    added = [c["path"] for c in dumps.diff({}, after)["added"]]
    assert added == ["/a", "/a/b", "/a-b", "/local/domain/1", "/local/domain/2", "/local/domain/10"]


def test_under_restricts_to_a_subtree():
    after = {"/local/domain/2/x": node("1"), "/local/domain/20/x": node("1"), "/local/domain/2": node("")}
    added = [c["path"] for c in dumps.diff({}, after, under="/local/domain/2")["added"]]
    assert added == ["/local/domain/2", "/local/domain/2/x"]  # not /local/domain/20


def test_ignore_globs_cross_slashes():
    after = {"/vm/abc/name": node("g"), "/local/domain/2/data/tick": node("5"), "/local/domain/2/name": node("g")}
    changes = dumps.diff({}, after, ignore=("/vm/*", "/local/domain/*/data/*"))
    assert [c["path"] for c in changes["added"]] == ["/local/domain/2/name"]
    assert dumps.check_ignore(["/vm/*", "*/data/*"]) == ("/vm/*", "*/data/*")
    with pytest.raises(ConfigError, match="--ignore 'vm' is not a XenStore path glob"):
        dumps.check_ignore(["vm"])


def test_values_quoted_as_xenstore_ls_quotes_them():
    changes = dumps.diff({"/a": node("x"), "/gone": node(None)}, {"/a": node("t\tb\\é"), "/new": node(None)})
    assert dumps.format_diff(changes) == ['~ /a: "x" -> "t\\tb\\\\\\xc3\\xa9"', "- /gone", "+ /new = (unreadable)"]
    assert dumps.format_diff(dumps.diff({"/p": node("", "n0")}, {"/p": {"value": "", "perms": []}})) == ["~ /p perms: n0 -> (none)"]


def test_read_tree_and_a_file_round_trip(tmp_path):
    fake = FakeXenstored()
    fake.nodes.update({"/t": b"", "/t/a": b"1", "/t/a/b": b"\xff", "/other": b"x"})
    xs = fake.store()
    try:
        doc = dumps.take(xs, "/t", lab="main")
        assert dumps.read_tree(xs, "/none", missing_ok=True) == {}
        with pytest.raises(Exception, match="ls /none: ENOENT"):
            dumps.read_tree(xs, "/none")
    finally:
        xs.close()
        fake.kill()
    assert list(doc["nodes"]) == ["/t", "/t/a", "/t/a/b"]
    assert doc["nodes"]["/t/a"] == {"value": "1", "perms": []}  # the fake has no get-perms
    assert doc["format"] == 1 and doc["lab"] == "main" and doc["path"] == "/t" and doc["taken"].endswith("Z")
    dumps.save(doc, tmp_path / "d.json")
    again = dumps.load(tmp_path / "d.json")
    assert again == doc and dumps.diff(again["nodes"], doc["nodes"])["changed"] == []  # bytes that are not UTF-8 survive


def write(tmp_path, content) -> str:
    f = tmp_path / "dump.json"
    f.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(f)


GOOD = {"format": 1, "lab": "main", "path": "/", "taken": "2026-12-01T00:00:00Z", "nodes": {"/": node("")}}


@pytest.mark.parametrize("content, message", [
    ("", "is not JSON (Expecting value at line 1 column 1)"),
    ("{not json", "is not JSON"),
    ([1, 2], "is JSON but not a XenStore dump"),
    ({"nodes": {}}, "is JSON but not a XenStore dump"),
    ({"path": "/", "value": "", "perms": ["n0"], "children": {}}, "old nested `xs dump --json` tree"),
    ({**GOOD, "format": 2}, "is a dump in format 2; this xenlab reads format 1"),
    ({**GOOD, "nodes": []}, "\"nodes\" must be an object"),
    ({**GOOD, "nodes": {"/a": {"value": 1, "perms": []}}}, "node '/a' is not"),
    ({**GOOD, "nodes": {"/a": {"value": "", "perms": "n0"}}}, "node '/a' is not"),
    ({**GOOD, "nodes": {"a": node("")}}, "node 'a' is not"),
    ({**GOOD, "path": "local"}, "\"path\" must be an absolute XenStore path"),
])
def test_bad_dump_files_are_named_with_what_to_do(tmp_path, content, message):
    file = write(tmp_path, content)
    with pytest.raises(ConfigError) as e:
        dumps.load(file)
    assert message in e.value.message and file in e.value.message
    assert "xenlab xs dump" in e.value.hint


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match=f"dump file {tmp_path}/nope.json does not exist") as e:
        dumps.load(tmp_path / "nope.json")
    assert "--out FILE" in e.value.hint
    with pytest.raises(ConfigError, match=f"cannot read dump file {tmp_path}: Is a directory"):
        dumps.load(tmp_path)


def test_a_good_file_loads_and_covers_its_subtrees(tmp_path):
    doc = dumps.load(write(tmp_path, {**GOOD, "path": "/local/domain/0"}))
    dumps.check_covers(doc, "/local/domain/0/backend", "f")
    with pytest.raises(ConfigError, match="f holds only /local/domain/0, so it cannot show what changed under /local/domain/00"):
        dumps.check_covers(doc, "/local/domain/00", "f")


def run(*args):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("[]", "is JSON but not a XenStore dump"),
    ("{", "is not JSON"),
])
def test_cli_refuses_a_bad_file_before_connecting(tmp_path, monkeypatch, content, message):
    monkeypatch.setenv("XENLAB_STATE", str(tmp_path))  # no lab: must fail on the file, not on SSH
    file = tmp_path / "before.json"
    if content is not None:
        file.write_text(content)
    result = run("xs", "dump", "--diff", str(file), "--lab", "nolab")
    assert result.exit_code == 2, result.output
    assert message in result.output and str(file) in result.output and "hint:" in result.output


def test_cli_input_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("XENLAB_STATE", str(tmp_path))
    result = run("xs", "dump", "--ignore", "/vm/*", "--lab", "nolab")
    assert result.exit_code == 2 and "--ignore goes with --diff" in result.output
    file = write(tmp_path, {**GOOD, "path": "/local"})
    result = run("xs", "dump", "/vm", "--diff", file, "--lab", "nolab")
    assert result.exit_code == 2 and "holds only /local" in result.output
    result = run("xs", "dump", "--diff", file, "--lab", "nolab")
    assert result.exit_code == 1 and "lab 'nolab' is not up" in result.output  # the file was fine


@pytest.fixture
def fake_lab(tmp_path, monkeypatch):
    """`xs` commands talking to in-process fake xenstoreds (one per
    connection, as the fake serves one) sharing these nodes, instead of a lab."""
    monkeypatch.setenv("XENLAB_STATE", str(tmp_path))
    nodes = {"/": b"", "/t": b"", "/t/a": b"1", "/t/b": b"2"}
    started = []

    def connect(lab, timeout):
        started.append(FakeXenstored())
        started[-1].nodes = nodes
        return started[-1].store()

    monkeypatch.setattr("xenlab.cli.xs.XenStore.for_lab", connect)
    yield nodes
    for fake in started:
        fake.kill()


def test_cli_dump_out_then_diff(tmp_path, fake_lab):
    before = tmp_path / "before.json"
    result = run("xs", "dump", "/t", "--out", str(before), "--lab", "fake")
    assert result.exit_code == 0 and f"3 nodes under /t saved to {before}" in result.output
    assert json.loads(before.read_text())["lab"] == "fake"
    fake_lab["/t/a"] = b"one"
    fake_lab["/t/c/d"] = fake_lab["/t/c"] = b""
    del fake_lab["/t/b"]
    result = run("xs", "dump", "--diff", str(before), "--lab", "fake")  # PATH: the file's
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[:4] == ['~ /t/a: "1" -> "one"', "- /t/b", '+ /t/c = ""', '+ /t/c/d = ""']
    assert "/t since the dump in" in result.output and "2 added, 1 removed, 1 changed" in result.output
    result = run("xs", "dump", "--diff", str(before), "--json", "--lab", "fake")
    changes = json.loads(result.stdout)  # the summary went to stderr
    assert [c["path"] for c in changes["added"]] == ["/t/c", "/t/c/d"] and changes["since"]["file"] == str(before)


def test_cli_diff_of_a_subtree_now_gone_shows_it_removed(tmp_path, fake_lab):
    before = tmp_path / "before.json"
    assert run("xs", "dump", "/t", "--out", str(before), "--lab", "fake").exit_code == 0
    for p in ("/t", "/t/a", "/t/b"):
        del fake_lab[p]
    result = run("xs", "dump", "--diff", str(before), "--lab", "fake")
    assert result.exit_code == 0 and result.output.splitlines()[:3] == ["- /t", "- /t/a", "- /t/b"]


def test_an_unwritable_out_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=f"cannot write dump file {tmp_path}/no/such/dir.json: No such file or directory"):
        dumps.save(GOOD, tmp_path / "no" / "such" / "dir.json")
