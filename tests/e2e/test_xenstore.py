"""XenStore through pyxs over SSH against dom0's real xenstored: round trips,
`xs ls -f` equal to xenstore-ls -f, transactions that conflict and retry,
watches, permissions (set/get, and from inside a domU: the real EACCES),
`xs dump --diff` showing a guest's device nodes come and go, the seed-003
layout of a guest's vbd and vif, bad input and dead connections."""

from __future__ import annotations

import json
import threading
import time

import pytest

from xenlab.guest.manager import Guests
from xenlab.guest.spec import DiskSpec, GuestSpec
from xenlab.xenstore.client import XenStore, XenStoreConnectionError, XenStoreRequestError
from xenlab.xenstore.layout import check_domain
from xenlab.xenstore.perms import check_guest

from .conftest import fresh_guest, xenlab

ROOT = "/xenlab-e2e"


@pytest.fixture(scope="module")
def xs(lab):
    with XenStore.for_lab(lab, timeout=30) as store:
        store.rm(ROOT)
        yield store
        store.rm(ROOT)


def cli(lab, *args, check=True, timeout=120):
    return xenlab("xs", args[0], "--name", lab.name, *args[1:], check=check, timeout=timeout)


def dom0(lab, command: str) -> str:
    with lab.ssh() as ssh:
        return ssh.check(command)


@pytest.mark.gate
def test_read_write_round_trips(lab, xs):
    values = {"plain": "hello", "empty": "", "tab": "a\tb", "utf8": "héllo wörld", "long": "x" * 4000}
    for key, value in values.items():
        xs.write(f"{ROOT}/rt/{key}", value)
    for key, value in values.items():
        assert xs.read(f"{ROOT}/rt/{key}") == value
    assert xs.ls(f"{ROOT}/rt") == list(values)
    # The same nodes through dom0's own tools, and the other way round.
    assert dom0(lab, f"xenstore-read {ROOT}/rt/plain").strip() == "hello"
    dom0(lab, f"xenstore-write {ROOT}/rt/from-dom0 written-by-the-tool")
    assert xs.read(f"{ROOT}/rt/from-dom0") == "written-by-the-tool"
    # And the CLI.
    cli(lab, "write", f"{ROOT}/cli/a", "1", f"{ROOT}/cli/b", "two words")
    assert cli(lab, "read", f"{ROOT}/cli/a", f"{ROOT}/cli/b").stdout == "1\ntwo words\n"
    cli(lab, "mkdir", f"{ROOT}/cli/dir")
    assert xs.read(f"{ROOT}/cli/dir") == "" and xs.ls(f"{ROOT}/cli/dir") == []
    cli(lab, "rm", f"{ROOT}/cli")
    assert not xs.exists(f"{ROOT}/cli")


@pytest.mark.full
def test_ls_f_identical_to_xenstore_ls(lab, xs):
    xs.write(f"{ROOT}/ls/binary", b"\x00\x01\x08\x1f\x7f\x80\xff\\\"")
    xs.write(f"{ROOT}/ls/long", "y" * 300)
    xs.write(f"{ROOT}/ls/deep/a/b/c/d/e/f/g/h/with-a-rather-long-name-to-cross-eighty-columns", "v" * 90)
    xs.set_perms(f"{ROOT}/ls/long", ["n0", "r1", "b2"])
    for args in (["-f", "/"], ["-f", ROOT], ["-f", "/local/domain/0"], ["/"], ["-f", "-p", "/"], ["-p", ROOT]):
        for _attempt in range(3):  # a guest of another test may change the tree between the two listings
            ours = cli(lab, "ls", *args).stdout
            theirs = dom0(lab, "xenstore-ls " + " ".join(args))
            if ours == theirs:
                break
        assert ours == theirs, f"xs ls {' '.join(args)} differs from xenstore-ls"
        assert len(theirs.splitlines()) > 5


@pytest.mark.gate
def test_transaction_conflict_is_retried(lab, xs):
    node = f"{ROOT}/tx/counter"
    xs.write(node, "0")
    with XenStore.for_lab(lab, timeout=30) as other:
        def body(tx):
            value = int(tx.read(node))
            if xs.tx_attempts == 1:
                other.write(node, "100")  # a commit by another connection meanwhile: EAGAIN
            tx.write(node, str(value + 1))
            return value

        assert xs.transaction(body) == 100
        assert xs.tx_attempts == 2 and xs.read(node) == "101"


@pytest.mark.full
def test_concurrent_increments_lose_nothing(lab, xs):
    node = f"{ROOT}/tx/shared"
    xs.write(node, "0")
    attempts = []

    def worker():
        with XenStore.for_lab(lab, timeout=30) as mine:
            for _ in range(10):
                mine.transaction(lambda tx: tx.write(node, str(int(tx.read(node)) + 1)))
                attempts.append(mine.tx_attempts)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert xs.read(node) == "30" and len(attempts) == 30, attempts  # however they interleaved, no increment is lost


@pytest.mark.full
def test_conflicting_commit_is_retried(lab, xs):
    # Made to conflict, not hoped to: a second connection writes the node
    # after the first attempt read it, so xenstored must refuse that commit
    # with EAGAIN and the retry must see the new value.
    node = f"{ROOT}/tx/conflict"
    xs.write(node, "0")
    seen = []
    with XenStore.for_lab(lab, timeout=30) as other:
        def bump(tx):
            value = int(tx.read(node))
            if not seen:
                other.write(node, "100")
            seen.append(value)
            tx.write(node, str(value + 1))

        xs.transaction(bump)
    assert seen == [0, 100] and xs.tx_attempts == 2 and xs.read(node) == "101"


@pytest.mark.gate
def test_watch_streams_events(lab, xs):
    with xs.watch(f"{ROOT}/w") as watch:
        assert watch.get(10).path == f"{ROOT}/w"  # fired on registration
        xs.write(f"{ROOT}/w/a", "1")
        xs.write(f"{ROOT}/w/a", "2")
        xs.rm(f"{ROOT}/w")
        got = [watch.get(10).path for _ in range(3)]
        assert got == [f"{ROOT}/w/a", f"{ROOT}/w/a", f"{ROOT}/w"]
        assert watch.get(0.5) is None
    # The CLI streams until its count.
    proc = subprocess_watch(lab, f"{ROOT}/w2", lambda: xs.write(f"{ROOT}/w2/x", "1"))
    lines = [json.loads(line) for line in proc.splitlines()]
    assert [e["path"] for e in lines] == [f"{ROOT}/w2", f"{ROOT}/w2/x"]


def subprocess_watch(lab, path, action) -> str:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "xenlab", "xs", "watch", path, "--name", lab.name, "-n", "2", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(8)  # connected and watching (the registration event is the first line)
    action()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out


@pytest.mark.gate
def test_perms_set_and_get(lab, xs):
    node = f"{ROOT}/perm/node"
    xs.write(node, "x")
    assert cli(lab, "perms", node, "n0", "r3", "b5").stdout.strip() == "n0 r3 b5"
    assert [str(p) for p in xs.get_perms(node)] == ["n0", "r3", "b5"]
    assert dom0(lab, f"xenstore-ls -p {ROOT}/perm").strip().endswith("(n0,r3,b5)")
    assert json.loads(cli(lab, "perms", node, "--json").stdout)[1] == {"access": "r", "domid": 3}


@pytest.mark.gate
def test_dump_json(lab, xs):
    xs.write(f"{ROOT}/dump/a", "1")
    doc = json.loads(cli(lab, "dump", f"{ROOT}/dump", "--json").stdout)
    assert doc["format"] == 1 and doc["lab"] == lab.name and doc["path"] == f"{ROOT}/dump"
    assert doc["nodes"][f"{ROOT}/dump/a"] == {"value": "1", "perms": ["n0"]}


@pytest.mark.full
def test_dump_diff_shows_a_guests_devices_come_and_go(lab, tmp_path):
    """What did the driver write: a dump, a guest with a disk, and --diff shows
    its real frontend and backend nodes added; destroyed, --diff shows them removed."""
    name = "xs-dump"
    xenlab("guest", "destroy", name, "--lab", lab.name, check=False)
    before, during = tmp_path / "before.json", tmp_path / "during.json"
    cli(lab, "dump", "--out", str(before))
    with fresh_guest(lab, GuestSpec(name=name, disks=(DiskSpec(16),))) as info:
        n = info["domid"]
        fe, be = f"/local/domain/{n}/device/vbd/51712", f"/local/domain/0/backend/vbd/{n}/51712"
        changes = json.loads(cli(lab, "dump", "--diff", str(before), "--out", str(during), "--json").stdout)
        added = {c["path"]: c for c in changes["added"]}
        for node in (f"/local/domain/{n}/name", fe, f"{fe}/state", f"{fe}/backend",
                     be, f"{be}/state", f"{be}/frontend", f"{be}/sectors"):
            assert node in added, f"{node} not in the diff's added nodes"
        # Written by blkfront itself (flat, or under queue-N/ with several queues).
        assert any(p.startswith(fe + "/") and "ring-ref" in p for p in added)
        assert any(p.startswith(fe + "/") and p.endswith("/event-channel") for p in added)
        assert added[f"{fe}/state"]["value"] == added[f"{be}/state"]["value"] == "4"  # Connected
        assert added[f"{fe}/backend"]["value"] == be and added[f"{be}/frontend"]["value"] == fe
        # Each end owned by its domain and readable by the other.
        assert added[f"{fe}/state"]["perms"][0] == f"n{n}" and "r0" in added[f"{fe}/state"]["perms"]
        assert added[f"{be}/state"]["perms"][0] == "n0" and f"r{n}" in added[f"{be}/state"]["perms"]
        assert not any(c["path"].startswith((fe, be)) for c in changes["removed"])
        text = cli(lab, "dump", "--diff", str(before)).stdout.splitlines()
        assert f'+ {fe}/state = "4"' in text and f'+ {be}/state = "4"' in text and f"+ {be}/frontend = \"{fe}\"" in text
    changes = json.loads(cli(lab, "dump", "--diff", str(during), "--json").stdout)
    removed = {c["path"] for c in changes["removed"]}
    assert {f"/local/domain/{n}", fe, f"{fe}/state", be, f"{be}/state"} <= removed
    assert not any(c["path"].startswith((f"/local/domain/{n}/", be)) for c in changes["added"])
    assert f"- {be}/state" in cli(lab, "dump", "--diff", str(during)).stdout.splitlines()
    # A dump of a subtree that is gone now: all of it removed.
    sub = cli(lab, "dump", be, "--diff", str(during), "--json")
    assert {c["path"] for c in json.loads(sub.stdout)["removed"]} == {p for p in removed if p == be or p.startswith(be + "/")}


@pytest.mark.full
def test_dump_diff_of_a_bad_file_is_a_clear_error(lab, tmp_path):
    (tmp_path / "not.json").write_text("xenstore-ls output, perhaps")
    for file, message in ((tmp_path / "missing.json", "does not exist"), (tmp_path / "not.json", "is not JSON")):
        proc = cli(lab, "dump", "--diff", str(file), check=False)
        assert proc.returncode == 2 and str(file) in proc.stdout + proc.stderr and message in proc.stdout + proc.stderr


@pytest.mark.parametrize("args, message", [
    (["read", f"{ROOT}/does/not/exist"], f"XenStore read {ROOT}/does/not/exist: ENOENT"),
    (["rm", f"{ROOT}/does-not-exist"], f"XenStore rm {ROOT}/does-not-exist: ENOENT"),
    (["ls", f"{ROOT}/does/not/exist"], f"XenStore ls {ROOT}/does/not/exist: ENOENT"),
    (["read", "/bad path"], "invalid XenStore path '/bad path'"),
    (["write", f"{ROOT}/big", "z" * 5000], f"value for {ROOT}/big is 5000 bytes"),
    (["perms", f"{ROOT}/does/not/exist"], f"get-perms {ROOT}/does/not/exist: ENOENT"),
])
@pytest.mark.gate
def test_bad_input_is_a_clear_error(lab, xs, args, message):
    start = time.monotonic()
    proc = cli(lab, *args, check=False, timeout=60)
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert time.monotonic() - start < 60


@pytest.mark.full
def test_dead_ssh_connection_is_a_clear_error_not_a_hang(lab):
    store = XenStore.for_lab(lab, timeout=30)
    store.read("/local/domain/0/name")
    store._owned.transport().close()  # the SSH connection dies under the client
    start = time.monotonic()
    with pytest.raises(XenStoreConnectionError) as e:
        store.read("/local/domain/0/domid")
    assert time.monotonic() - start < 10
    assert "/local/domain/0/domid" in str(e.value) and "lab" in str(e.value)
    store.close()


@pytest.mark.full
def test_lab_down_is_a_clear_error(tmp_path):
    proc = xenlab("xs", "read", "/local/domain/0/name", "--name", "xs-never-up", check=False, timeout=60)
    assert proc.returncode != 0 and "lab 'xs-never-up' is not up" in proc.stdout + proc.stderr


# -- guests: layout and permissions ---------------------------------------------

@pytest.fixture(scope="module")
def guests(lab):
    """A python guest with a disk and a NIC, and a second (busybox) domain."""
    with Guests(lab) as g:
        for name in ("xs-a", "xs-b"):
            xenlab("guest", "destroy", name, "--lab", lab.name, check=False)
        a = json.loads(xenlab("guest", "create", "xs-a", "--lab", lab.name, "--root", "python", "--disk", "16M", "--net", "--json").stdout)
        b = json.loads(xenlab("guest", "create", "xs-b", "--lab", lab.name, "--json").stdout)
        try:
            yield g, a, b
        finally:
            for name in ("xs-a", "xs-b"):
                xenlab("guest", "destroy", name, "--lab", lab.name, check=False)


@pytest.mark.full
def test_layout_of_every_vbd_and_vif(xs, guests):
    _, a, _ = guests
    layouts = check_domain(xs, a["domid"])
    assert {(d.kind, d.devid) for d in layouts} == {("vbd", "51712"), ("vif", "0")}
    for d in layouts:
        assert d.ok, d.problems
        assert d.backend == f"/local/domain/0/backend/{d.kind}/{a['domid']}/{d.devid}" and d.backend_domid == 0
        assert d.frontend_state == d.backend_state == "Connected"
        assert d.event_channels and all(int(v) > 0 for v in d.event_channels.values())
    vbd = next(d for d in layouts if d.kind == "vbd")
    vif = next(d for d in layouts if d.kind == "vif")
    assert any(k.startswith("ring-ref") or "/ring-ref" in k for k in vbd.rings)
    assert any(k.endswith("tx-ring-ref") for k in vif.rings) and any(k.endswith("rx-ring-ref") for k in vif.rings)


@pytest.mark.full
def test_layout_check_reports_a_broken_pointer(xs, guests):
    _, a, _ = guests
    fe = f"/local/domain/{a['domid']}/device/vbd/51712"
    original = xs.read(f"{fe}/backend-id")
    xs.write(f"{fe}/backend-id", "7")
    try:
        vbd = next(d for d in check_domain(xs, a["domid"]) if d.kind == "vbd")
        assert not vbd.ok and any("backend-id = 7" in p for p in vbd.problems)
    finally:
        xs.write(f"{fe}/backend-id", original)


@pytest.mark.full
def test_domu_permissions_and_real_eacces(xs, guests):
    g, a, b = guests
    checks = check_guest(g, xs, "xs-a", a["domid"], b["domid"])
    failed = [f"{c.what}: expected {c.expected}, got {c.got} {c.detail}" for c in checks if not c.passed]
    assert not failed, failed
    denied = [c for c in checks if c.expected == "EACCES"]
    assert len(denied) >= 6 and all(c.got == "EACCES" for c in denied)  # xenstored's own error string


@pytest.mark.full
def test_domu_sees_enoent_for_its_own_missing_node(guests):
    g, a, _ = guests
    from xenlab.xenstore.perms import run_in_guest

    (answer,) = run_in_guest(g, "xs-a", [["read", f"/local/domain/{a['domid']}/data/none-such"]])
    assert answer == {"ok": False, "error": "ENOENT", "request": ["read", f"/local/domain/{a['domid']}/data/none-such"]}


@pytest.mark.full
def test_request_error_keeps_errno(xs):
    with pytest.raises(XenStoreRequestError) as e:
        xs.read(f"{ROOT}/none-such")
    assert e.value.errno == 2 and e.value.path == f"{ROOT}/none-such"
