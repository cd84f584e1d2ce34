"""e2e fixtures: a real lab (Xen under QEMU/TCG) shared by the session.

In CI a missing prerequisite fails the run; elsewhere it skips with the reason."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from xenlab.build import dom0 as images

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
XENLAB = [sys.executable, "-m", "xenlab"]
# Under pytest-xdist (`-n 2 --dist loadgroup`, docs/testing.md#two-workers)
# each worker's session lab has a name of its own.
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
LAB = os.environ.get("XENLAB_E2E_LAB", "e2e") + (f"-{WORKER}" if WORKER else "")
SESSION_LAB_GROUP = "session-lab"


def xenlab(*args: str, check: bool = True, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(XENLAB + list(args), capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"xenlab {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def _missing_prerequisites() -> list[str]:
    missing = [t for t in ("qemu-system-x86_64", "qemu-img", "mmdebstrap", "mkfs.ext4") if not shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
    if os.geteuid() != 0 and (problem := images.user_namespace_problem()):
        missing.append(f"root or a user namespace for image builds ({problem})")
    return missing


def lab_prerequisites() -> None:
    """Fail in CI, skip elsewhere, when the host cannot run a lab."""
    missing = _missing_prerequisites()
    if missing:
        message = "e2e prerequisites missing: " + ", ".join(missing) + " (run ci/setup-host.sh)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def pytest_configure(config):
    # The session lab is the plugin's own (xenlab_lab), as users get it; the
    # plugin appends an xdist worker's id to this name itself.
    config.option.xenlab_name = os.environ.get("XENLAB_E2E_LAB", "e2e")


@pytest.fixture(scope="session")
def _no_stale_session_lab():
    """A lab of the session's name left up by an earlier run is stopped
    first: the session starts from a restored lab, not from leftovers."""
    lab_prerequisites()
    xenlab("down", "--name", LAB, check=False)


@pytest.fixture(scope="session")
def lab_info(_no_stale_session_lab, xenlab_lab):
    """The session lab's info (lab.json), booted by the plugin's xenlab_lab
    fixture, which stops it at the end; a test using it that fails gets the
    plugin's artifacts (serial log, xl dmesg, consoles)."""
    return xenlab_lab.info()


class Dom0Shell:
    """Commands in the session lab's dom0 over one SSH connection kept for
    the session: a `xenlab ssh` process per command paid a Python start and
    an SSH handshake (about 1 s under TCG) for each. `xenlab ssh` itself is
    tested in test_lab.py. A connection a reset or restart cut is made again."""

    def __init__(self):
        self.session = None

    def _connected(self):
        from xenlab import config
        from xenlab import Lab

        if self.session is None or not self.session.active:
            self.close()
            self.session = Lab(config.load(overrides={"name": LAB})).ssh(timeout=60)
        return self.session

    def run(self, command: str, check: bool = True) -> subprocess.CompletedProcess:
        from xenlab.errors import SSHError

        try:
            result = self._connected().run(command, timeout=600)
        except SSHError:
            if self.session is not None and self.session.active:
                raise
            # The lab was reset or restarted under the connection, which only now says so.
            result = self._connected().run(command, timeout=600)
        proc = subprocess.CompletedProcess(command, result.exit_status, result.stdout, result.stderr)
        if check and proc.returncode != 0:
            raise AssertionError(f"in dom0: {command!r} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
        return proc

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None


@pytest.fixture(scope="session")
def _dom0_shell(lab_info):
    shell = Dom0Shell()
    try:
        yield shell
    finally:
        shell.close()


@pytest.fixture
def dom0(_dom0_shell):
    """Run a command in dom0 (the session lab), returning a CompletedProcess."""
    return _dom0_shell.run


@pytest.fixture(scope="module")
def lab(lab_info):
    """The shared lab as a Lab object, for tests that use the Python API."""
    from xenlab import config
    from xenlab import Lab

    return Lab(config.load(overrides={"name": LAB}))


@contextmanager
def fresh_guest(lab, spec):
    """A guest of the test's own (a leftover of an earlier run is destroyed
    first); destroyed afterwards whatever happens."""
    from xenlab.guest.manager import Guests

    with Guests(lab) as guests:
        if any(g.get("name") == spec.name for g in guests.list()):
            guests.destroy(spec.name)
        info = guests.create(spec)
    try:
        yield info
    finally:
        with Guests(lab) as guests:
            guests.destroy(spec.name)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under `--dist loadgroup` the tests on the session lab stay on one
    worker, in order: under TCG every vCPU wants a core, so two session labs
    of two vCPUs on two cores would only fight (docs/plugin.md). A module
    marked own_labs boots labs of its own: it is a group of its own, which
    the other worker runs beside them."""
    if not config.pluginmanager.hasplugin("xdist"):
        return  # the ordinary-user pass installs no pytest-xdist, which owns the mark
    for item in items:
        if "e2e" not in item.path.parts or item.get_closest_marker("xdist_group"):
            continue
        own = item.get_closest_marker("own_labs") is not None
        item.add_marker(pytest.mark.xdist_group(item.module.__name__ if own else SESSION_LAB_GROUP))


def vcpu_affinities(lab) -> dict:
    """{(domid, vcpu): "HARD / SOFT"} of every domain, from `xl vcpu-list`."""
    with lab.ssh() as ssh:
        rows = [line.split() for line in ssh.check("xl vcpu-list").splitlines()[1:]]
    return {(r[-8], r[-7]): " ".join(r[-3:]) for r in rows}


@pytest.fixture(scope="module")
def kernel_dir(lab_info) -> Path:
    """The minimal guest kernel's build directory, as `xenlab guest kernel-dir` prints it."""
    path = Path(xenlab("guest", "kernel-dir").stdout.strip())
    assert (path / "Module.symvers").exists() and (path / ".config").exists() and (path / "source").is_dir()
    return path


def build_module(kernel_dir: Path, where: Path, file_name: str, source: str) -> Path:
    """A one-file module (`file_name`.c holding `source`) built against kernel_dir in `where`: its .ko."""
    where.mkdir(parents=True, exist_ok=True)
    (where / f"{file_name}.c").write_text(source)
    (where / "Makefile").write_text(f"obj-m := {file_name}.o\n")
    made = subprocess.run(["make", "-C", str(kernel_dir), f"M={where}", "modules"], capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    return where / f"{file_name}.ko"
