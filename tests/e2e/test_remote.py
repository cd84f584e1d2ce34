"""A lab on another libvirt host, `--connect qemu+libssh://USER@HOST:PORT/session`,
on the stand-in host of ci/standin_host.py (a second account reached through
an sshd of its own on 127.0.0.1, which cannot read the caller's paths): the
files go over libvirt's storage API and dom0's SSH through a tunnel."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .conftest import xenlab

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ci"))
import standin_host  # noqa: E402

pytestmark = pytest.mark.own_labs  # boots labs of its own: under xdist, beside the session lab's tests

pytest_plugins = ["pytester"]
REAL_HOME = os.environ.get("HOME") or str(Path.home())  # pytester points HOME elsewhere
LAB = "e2e-remote"
REMOTE_USER = standin_host.REMOTE_USER


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StandIn:
    """The stand-in host: its URI, its folder (keys, sshd config and log) and its sshd."""

    def __init__(self, folder: Path):
        self.dir = folder
        self.uri, self.sshd = standin_host.start(folder)


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """The stand-in host; its sshd and the libvirt session daemon it started end with the module."""
    assert os.stat("/root").st_mode & 0o001 == 0  # the caller's home is closed to the remote user
    try:
        host = StandIn(tmp_path_factory.mktemp("remote-host"))
    except standin_host.StandInError as e:
        pytest.fail(str(e))
    try:
        yield host
    finally:
        xenlab("down", "--lab", LAB, check=False)
        standin_host.stop(Path(), host.sshd)


@pytest.fixture
def remote_uri(standin):
    return standin.uri


def _on_remote(uri: str, ask):
    """ask(conn) on a libvirt connection of the test's own to the stand-in host."""
    import libvirt

    libvirt.virEventRegisterDefaultImpl()
    conn = libvirt.open(uri)
    try:
        return ask(conn)
    finally:
        conn.close()


def _remote_volumes(uri: str) -> list[str]:
    def ask(conn):
        pool = conn.storagePoolLookupByName("xenlab")
        pool.refresh(0)
        return sorted(v.name() for v in pool.listAllVolumes())
    return _on_remote(uri, ask)


def _remote_domains(uri: str) -> list[str]:
    return _on_remote(uri, lambda conn: [d.name() for d in conn.listAllDomains()])


@pytest.mark.gate
def test_a_lab_on_a_remote_host(remote_uri):
    up = json.loads(xenlab("up", "--lab", LAB, "--connect", remote_uri, "--json").stdout)
    assert up["uri"] == remote_uri and up["versions"]["remote_host"].startswith(f"{REMOTE_USER}@127.0.0.1:")
    try:
        # The VM is the remote user's QEMU, reading files in that user's pool only.
        qemu = standin_host.as_remote_user("pgrep", "-u", REMOTE_USER, "-a", "qemu-system")
        assert f"guest=xenlab-{LAB}" in qemu.stdout, qemu.stdout
        home = pwd.getpwnam(REMOTE_USER).pw_dir
        dumped = _on_remote(remote_uri, lambda conn: conn.lookupByName(f"xenlab-{LAB}").XMLDesc(0))
        assert f"{home}/.local/share/xenlab/pool/lab-{LAB}.qcow2" in dumped and "/root/" not in dumped, dumped
        volumes = _remote_volumes(remote_uri)
        assert f"lab-{LAB}.qcow2" in volumes and any(v.endswith("-rootfs.qcow2") for v in volumes), volumes
        # dom0 through the tunnel: status, a command, a guest.
        status = json.loads(xenlab("status", "--lab", LAB, "--json").stdout)
        assert status["state"] == "up" and status["xen_version"].startswith("4."), status
        assert xenlab("ssh", "--lab", LAB, "--", "xl", "list").stdout.startswith("Name")
        # The serial log is QEMU's file there; `console` brings it up to date after boot too.
        xenlab("ssh", "--lab", LAB, "--", "echo '<2>xenlab-remote-console-mark' > /dev/kmsg")
        shown = xenlab("console", "--lab", LAB, "-n", "400").stdout
        assert "xenlab-remote-console-mark" in shown, shown[-2000:]
        created = json.loads(xenlab("guest", "create", "--lab", LAB, "rg1", "--disk", "8M", "--json").stdout)
        assert created["domid"] > 0
        assert xenlab("guest", "exec", "--lab", LAB, "rg1", "--", "cat", "/sys/block/xvda/size").stdout.strip() == "16384"
        xenlab("guest", "destroy", "--lab", LAB, "rg1")
    finally:
        down = json.loads(xenlab("down", "--lab", LAB, "--json").stdout)
    assert down["was_running"]
    # Nothing of the lab is left there: no domain, no QEMU, not its disk or serial log.
    left = _remote_volumes(remote_uri)
    assert not [v for v in left if v.startswith(f"lab-{LAB}")], left
    assert f"xenlab-{LAB}" not in _remote_domains(remote_uri)
    assert standin_host.as_remote_user("pgrep", "-u", REMOTE_USER, "qemu-system").returncode != 0


@pytest.mark.full
def test_unreachable_and_refused_remote_hosts(remote_uri, tmp_path):
    closed = _free_port()
    proc = xenlab("up", "--lab", "e2e-remote-bad", "--connect", f"qemu+libssh://{REMOTE_USER}@127.0.0.1:{closed}/session", check=False)
    assert proc.returncode != 0 and f"127.0.0.1:{closed}" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "stranger")], check=True)
    wrong_key = remote_uri.replace(remote_uri.split("keyfile=")[1].split("&")[0], str(tmp_path / "stranger"))
    proc = xenlab("up", "--lab", "e2e-remote-bad", "--connect", wrong_key, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "authentication" in proc.stderr.lower() or "auth" in proc.stderr.lower(), proc.stderr
    assert "xenlab-e2e-remote-bad" not in _remote_domains(remote_uri)


SPREAD = """
import json
import os
from pathlib import Path


def test_where(xenlab_lab, xenlab_dom0):
    header = xenlab_dom0.check("xl list | head -1").split()[0]
    record = {"lab": xenlab_lab.name, "uri": xenlab_lab.uri(), "xl": header}
    Path(__file__).with_name(f"where-{os.environ['PYTEST_XDIST_WORKER']}.json").write_text(json.dumps(record))
"""


@pytest.mark.full
def test_xdist_workers_spread_over_the_local_driver_and_the_remote_host(remote_uri, pytester, monkeypatch):
    """`--xenlab-connect ',URI'` under `pytest -n 2`: worker gw0 gets a lab of
    the embedded driver here, gw1 one on the remote host; both run the test."""
    monkeypatch.setenv("HOME", REAL_HOME)
    pytester.makepyfile(test_spread=SPREAD)
    name = "e2e-spread"
    try:
        result = pytester.runpytest_subprocess("-n", "2", "--dist", "each", "--xenlab-name", name, "--xenlab-connect", f",{remote_uri}",
                                               "-p", "no:cacheprovider", "-p", "no:randomly", timeout=1200)
        result.assert_outcomes(passed=2)
        seen = {w: json.loads((pytester.path / f"where-{w}.json").read_text()) for w in ("gw0", "gw1")}
        assert seen["gw0"]["lab"] == f"{name}-gw0" and seen["gw0"]["uri"].startswith("qemu:///embed"), seen
        assert seen["gw1"]["lab"] == f"{name}-gw1" and seen["gw1"]["uri"] == remote_uri, seen
        assert seen["gw0"]["xl"] == seen["gw1"]["xl"] == "Name"
        # The session booted both, so it stopped both: nothing of gw1's lab is left on the remote host.
        assert not [v for v in _remote_volumes(remote_uri) if v.startswith(f"lab-{name}")]
    finally:
        for worker in ("gw0", "gw1"):
            subprocess.run([sys.executable, "-m", "xenlab", "down", "--lab", f"{name}-{worker}"], capture_output=True)


GOES_AWAY = """
import os
import pytest
import standin_host
from xenlab.errors import XenlabError


def test_the_remote_host_goes_away(xenlab_lab, xenlab_dom0):
    assert xenlab_dom0.check("xl list | head -1").startswith("Name")
    if xenlab_lab.remote is None:
        return  # the worker with a lab here: unaffected by the other's host
    standin_host.cut_off(int(os.environ["STANDIN_SSHD_PID"]))
    with pytest.raises(XenlabError) as lost:
        xenlab_dom0.check("xl list")
    print("ERROR:", lost.value)
    assert xenlab_lab.remote.where in str(lost.value)
    assert xenlab_lab.state()[0] == "unreachable"
"""


@pytest.mark.full
def test_a_remote_host_that_goes_away_mid_test(standin, pytester, monkeypatch):
    """gw1's host goes away during its test: gw1's lab operations fail naming
    the host, gw0's lab here is unaffected, and once the host answers again
    `down` removes what the lab left there."""
    monkeypatch.setenv("HOME", REAL_HOME)
    monkeypatch.setenv("STANDIN_SSHD_PID", str(standin.sshd.pid))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(Path(standin_host.__file__).parent), os.environ.get("PYTHONPATH")])))
    pytester.makepyfile(test_goes_away=GOES_AWAY)
    name = "e2e-gone"
    try:
        result = pytester.runpytest_subprocess("-n", "2", "--dist", "each", "--xenlab-name", name, "--xenlab-connect", f",{standin.uri}",
                                               "-p", "no:cacheprovider", "-p", "no:randomly", "-s", timeout=1200)
        out = result.stdout.str()
        print(out)  # shown when the test fails
        # Both tests pass; gw1's session cannot stop its lab at the end and says where and what to do.
        result.assert_outcomes(passed=2, errors=1)
        where = f"{REMOTE_USER}@127.0.0.1:"
        assert f"cannot stop lab '{name}-gw1' on its libvirt host {where}" in out, out
        assert f"xenlab down --lab {name}-gw1" in out, out
        standin.sshd.wait(timeout=10)
        # gw0's lab here was booted and stopped by its session as usual.
        assert json.loads(xenlab("status", "--lab", f"{name}-gw0", "--json").stdout)["state"] == "down"
        status = json.loads(xenlab("status", "--lab", f"{name}-gw1", "--json").stdout)
        assert status["state"] == "unreachable" and where in status["hint"], status
        # Cut off, not gone: the lab still runs there, until `down` once the host is back.
        assert standin_host.as_remote_user("pgrep", "-u", REMOTE_USER, "-a", "qemu-system").stdout.count(f"guest=xenlab-{name}-gw1") == 1
        standin.sshd = standin_host.come_back(standin.dir, standin.uri)
        down = json.loads(xenlab("down", "--lab", f"{name}-gw1", "--json").stdout)
        assert down["was_running"], down
        assert not [v for v in _remote_volumes(standin.uri) if v.startswith(f"lab-{name}")]
        assert f"xenlab-{name}-gw1" not in _remote_domains(standin.uri)
        assert standin_host.as_remote_user("pgrep", "-u", REMOTE_USER, "qemu-system").returncode != 0
    finally:
        if standin.sshd.poll() is not None:
            standin.sshd = standin_host.come_back(standin.dir, standin.uri)
        for worker in ("gw0", "gw1"):
            subprocess.run([sys.executable, "-m", "xenlab", "down", "--lab", f"{name}-{worker}"], capture_output=True)


@pytest.mark.full
def test_too_little_space_on_the_remote_host(standin):
    """A pool without room for the upload: refused before anything is sent,
    naming the host, the space and what is needed; nothing left on either side."""
    account = pwd.getpwnam(REMOTE_USER)
    pool_dir = Path(account.pw_dir) / ".local/share/xenlab/pool"
    standin_host.as_remote_user("mkdir", "-p", str(pool_dir))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=200m,uid={account.pw_uid},gid={account.pw_gid},mode=0755",
                    "xenlab-e2e-small-pool", str(pool_dir)], check=True)
    try:
        lab = "e2e-remote-full"
        proc = xenlab("up", "--lab", lab, "--connect", standin.uri, check=False)
        print(proc.stderr)  # shown when the test fails
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert f"on {REMOTE_USER}@127.0.0.1:" in proc.stderr and "MiB free" in proc.stderr and "needs" in proc.stderr, proc.stderr
        assert _remote_volumes(standin.uri) == []  # nothing was sent
        assert f"xenlab-{lab}" not in _remote_domains(standin.uri)
        assert json.loads(xenlab("status", "--lab", lab, "--json").stdout)["state"] == "down"
    finally:
        subprocess.run(["umount", str(pool_dir)], check=True)


@pytest.mark.full
def test_a_remote_host_without_qemu(standin, tmp_path):
    """A host whose libvirt finds no QEMU (its session daemon runs with a PATH
    without qemu-system-*): refused before anything is sent, naming the host."""
    bin_dir = Path(tempfile.mkdtemp(prefix="xenlab-e2e-noqemu-", dir="/tmp"))  # the remote user cannot enter root's tmp_path
    try:
        bin_dir.chmod(0o755)
        for tool in Path("/usr/bin").iterdir():
            if not tool.name.startswith("qemu-system-"):
                (bin_dir / tool.name).symlink_to(tool)
        standin_host.end_session_daemon()  # the next connection starts one with the new PATH
        uri, sshd = standin_host.start(tmp_path / "no-qemu-host", session_path=f"{bin_dir}:/usr/sbin")
        try:
            before = _remote_volumes(uri)
            proc = xenlab("up", "--lab", "e2e-remote-noqemu", "--connect", uri, check=False)
            print(proc.stderr)  # shown when the test fails
            assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
            assert f"the libvirt host {REMOTE_USER}@127.0.0.1:" in proc.stderr and "no QEMU for x86_64" in proc.stderr, proc.stderr
            assert "install qemu-system-x86" in proc.stderr, proc.stderr
            assert _remote_volumes(uri) == before and "xenlab-e2e-remote-noqemu" not in _remote_domains(uri)
        finally:
            standin_host.stop(Path(), sshd)  # and its session daemon: the other tests' start anew with QEMU
    finally:
        shutil.rmtree(bin_dir)
