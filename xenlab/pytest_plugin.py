"""pytest plugin (entry point pytest11 `xenlab`): the real lab for users' own
driver tests.

Fixtures:
    xenlab_lab            (session) the lab, booted once unless one of that
                          name is already up; stopped at the end only if this
                          session booted it and --xenlab-keep was not given
    xenlab_dom0           (session) run commands in dom0, copy files in and
                          out, and a XenStore client (`.xs`)
    xenlab_guest_factory  (function) make(...) -> a fresh PV domU for this
                          test, destroyed when the test ends
Marker: @pytest.mark.xenlab makes a test use the lab without naming a fixture.

When a test that uses the lab fails, the serial log, `xl dmesg`, `xl list`,
dom0's dmesg, every guest console and a XenStore dump are saved in
<--xenlab-artifacts>/<test id>/ and the folder is named in the report.

The plugin is inert for tests that use neither a fixture nor the marker:
nothing from the lab side is even imported."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import pytest

ARTIFACTS_KEY = "xenlab_artifacts"
_HANDLE = "_xenlab_handle"  # the session's XenLab, set once the lab fixture ran
SERIAL_MAX = 4 << 20  # bytes of the serial log's end kept per failed test


def pytest_addoption(parser):
    group = parser.getgroup("xenlab", "xenlab: a real nested Xen lab")
    group.addoption("--xenlab-name", default=os.environ.get("XENLAB_NAME", "pytest"),
                    help="name of the lab the tests use; one already up is reused and left running (default: $XENLAB_NAME or 'pytest')")
    group.addoption("--xenlab-keep", action="store_true", help="leave the lab running after the session even if this session booted it")
    group.addoption("--xenlab-connect", default="", help="libvirt URI for booting the lab (default: embedded driver, no daemon)")
    group.addoption("--xenlab-config", default=os.environ.get("XENLAB_CONFIG", ""), help="a TOML file over configs/default.toml")
    group.addoption("--xenlab-artifacts", default="", help="where failed tests' logs go (default: <rootdir>/xenlab-artifacts)")


def pytest_configure(config):
    config.addinivalue_line("markers", "xenlab: the test needs the real Xen lab (booted once per session); failures save its logs")


def _uses_lab(item) -> bool:
    return "xenlab_lab" in getattr(item, "fixturenames", ()) or item.get_closest_marker("xenlab") is not None


@pytest.fixture(autouse=True)
def _xenlab_marker(request):
    """@pytest.mark.xenlab: pull in the lab (tests without the marker pay nothing)."""
    if request.node.get_closest_marker("xenlab") is not None:
        request.getfixturevalue("xenlab_lab")


# -- handles ---------------------------------------------------------------------------

class XenLab:
    """The session's lab: `lab` is xenlab.orchestrate.lab.Lab, `info` what `up` reported."""

    def __init__(self, lab, info: dict, booted: bool):
        self.lab, self.info, self.booted = lab, info, booted
        self.name = lab.name
        self.serial_log: Path = lab.serial_log

    def ssh(self):
        """A new SSHSession to dom0 (close it, or use it in a with block)."""
        return self.lab.ssh()

    def status(self) -> dict:
        return self.lab.status()

    def __repr__(self) -> str:
        return f"XenLab({self.name!r}, ssh 127.0.0.1:{self.info.get('ssh_port')})"


class Dom0:
    """dom0 of the lab: run(), check(), put(), get(), and `xs` (XenStore)."""

    def __init__(self, lab: XenLab):
        self._lab = lab
        self._ssh = None
        self._xs = None

    @property
    def ssh(self):
        transport = self._ssh.client.get_transport() if self._ssh is not None and self._ssh._client is not None else None
        if transport is None or not transport.is_active():
            self._ssh = self._lab.ssh()
        return self._ssh

    def run(self, command: str | list[str], timeout: float = 120, input: bytes | None = None):
        """CommandResult (command, exit_status, stdout, stderr, ok); never raises on a non-zero exit."""
        return self.ssh.run(command, timeout=timeout, input=input)

    def check(self, command: str | list[str], timeout: float = 120, input: bytes | None = None) -> str:
        """stdout; SSHError naming the command, exit code and stderr on failure."""
        return self.ssh.check(command, timeout=timeout, input=input)

    def put(self, src: bytes | str | Path, remote: str, mode: int = 0o644) -> None:
        """Copy bytes, or a local file (str/Path), to `remote` in dom0."""
        data = src if isinstance(src, bytes) else Path(src).read_bytes()
        self.ssh.put(data, remote, mode)

    def get(self, remote: str, local: str | Path | None = None) -> bytes:
        """The content of `remote` in dom0 (also written to `local` when given)."""
        sftp = self.ssh.client.open_sftp()
        try:
            with sftp.open(remote, "rb") as f:
                data = f.read()
        finally:
            sftp.close()
        if local is not None:
            Path(local).write_bytes(data)
        return data

    @property
    def xs(self):
        """xenlab.xenstore.XenStore on dom0's xenstored (read, write, ls, rm, watch, transaction, ...)."""
        from .xenstore.client import XenStore

        if self._xs is None or not self._xs.connected:
            self._xs = XenStore.for_lab(self._lab.lab, timeout=30)
        return self._xs

    def close(self) -> None:
        for thing in (self._xs, self._ssh):
            if thing is not None:
                thing.close()
        self._xs = self._ssh = None


class Guest:
    """A domU made by xenlab_guest_factory: exec(), console(), check(), and its create report."""

    def __init__(self, guests, info: dict):
        self._guests = guests
        self.info = info
        self.name: str = info["name"]
        self.domid: int = info["domid"]
        self.ip: str | None = info["ip"] if info.get("net") else None

    def exec(self, command: str, input: bytes = b"", timeout: float = 120):
        """Run `sh -c command` in the guest (over its Xen console): CommandResult."""
        return self._guests.exec(self.name, command, input=input, timeout=timeout)

    def console(self, lines: int = 100) -> str:
        return self._guests.console(self.name, lines)["tail"]

    def check(self) -> list[dict]:
        """The block/network ring I/O checks of `xenlab guest check`."""
        return self._guests.check(self.name)

    def __repr__(self) -> str:
        return f"Guest({self.name!r}, domid {self.domid})"


# -- fixtures --------------------------------------------------------------------------

def _lab_from_options(config):
    from .config import load
    from .orchestrate.lab import Lab

    opt = config.getoption
    cfg_file = Path(opt("--xenlab-config")) if opt("--xenlab-config") else None
    return Lab(load(cfg_file, {"name": opt("--xenlab-name"), "connect": opt("--xenlab-connect") or None}))


@pytest.fixture(scope="session")
def xenlab_lab(request) -> XenLab:
    """The lab for the whole session. A failure to boot is an error of every
    test using it (never a skip), with the serial log's tail."""
    from .progress import Steps

    lab = _lab_from_options(request.config)
    booted = False
    if lab.info() is None or not lab.running():
        lab.up(Steps(quiet=True))
        booted = True
    handle = XenLab(lab, lab.require_up(), booted)
    setattr(request.config, _HANDLE, handle)
    yield handle
    setattr(request.config, _HANDLE, None)
    if booted and not request.config.getoption("--xenlab-keep"):
        lab.down()


@pytest.fixture(scope="session")
def xenlab_dom0(xenlab_lab) -> Dom0:
    dom0 = Dom0(xenlab_lab)
    yield dom0
    dom0.close()


def guest_name(nodeid: str, n: int) -> str:
    """A valid guest name (1-32 of a-z 0-9 - _) from the test's name and a counter."""
    test = nodeid.rsplit("::", 1)[-1]
    slug = re.sub(r"[^a-z0-9]+", "-", test.lower().removeprefix("test_").removeprefix("test")).strip("-") or "t"
    # The slug may be cut short (parametrized ids differ at the end): a digest keeps tests apart.
    suffix = f"-{hashlib.sha1(nodeid.encode()).hexdigest()[:4]}-{n}"
    return ("pt-" + slug)[: 32 - len(suffix)].rstrip("-") + suffix


@pytest.fixture
def xenlab_guest_factory(xenlab_lab, request):
    """make(name=None, *, memory="128M", vcpus=1, disks=(), net=False, root="busybox",
    kernel="minimal", timeout=120, extra="") -> Guest. Each guest is this test's
    own and is destroyed when the test ends (pass or fail)."""
    from .config import parse_mib
    from .errors import XenlabError
    from .guest.manager import DiskSpec, Guests, GuestSpec

    guests = Guests(xenlab_lab.lab)
    made: list[str] = []

    def make(name: str | None = None, *, memory: str | int = "128M", vcpus: int = 1, disks=(), net: bool = False,
             root: str = "busybox", kernel: str = "minimal", timeout: float = 120, extra: str = "") -> Guest:
        name = name or guest_name(request.node.nodeid, len(made) + 1)
        spec = GuestSpec(
            name=name, memory=memory if isinstance(memory, int) else parse_mib(memory, "memory"), vcpus=vcpus,
            disks=tuple(d if isinstance(d, DiskSpec) else DiskSpec.parse(d) for d in disks),
            net=net, kernel=kernel, root=root, timeout=timeout, extra=extra,
        ).validate()
        if any(g["name"] == name and g["state"] != "gone" for g in guests.list()):
            guests.destroy(name)  # a leftover of an interrupted earlier run
        made.append(name)  # before create: a create that fails half-way is still cleaned up
        return Guest(guests, guests.create(spec))

    yield make
    problems = []
    try:
        for name in made:
            try:
                guests.destroy(name)
            except XenlabError as e:
                if "no guest named" not in e.message:
                    problems.append(f"{name}: {e.message}")
    finally:
        guests.close()
    if problems:
        pytest.fail("xenlab could not destroy the test's guests: " + "; ".join(problems), pytrace=False)


# -- artifacts of failed tests ----------------------------------------------------------

def artifacts_dir(config, nodeid: str) -> Path:
    root = config.getoption("--xenlab-artifacts")
    base = Path(root) if root else Path(config.rootpath) / "xenlab-artifacts"
    return base / re.sub(r"[^A-Za-z0-9._-]+", "_", nodeid).strip("_")[:150]


def save_artifacts(handle: XenLab | None, lab, folder: Path) -> list[str]:
    """Everything worth reading after a failure; each item on its own, so a dead
    lab still yields the serial log. Returns the file names written."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    written = []

    def save(name: str, produce) -> None:
        try:
            data = produce()
        except Exception as e:  # noqa: BLE001 - record why, keep collecting the rest
            data = f"could not collect {name}: {type(e).__name__}: {e}\n"
            name += ".error"
        (folder / name).write_text(data if isinstance(data, str) else data.decode(errors="replace"))
        written.append(name)

    def serial() -> bytes:
        with open(lab.serial_log, "rb") as f:
            f.seek(max(0, lab.serial_log.stat().st_size - SERIAL_MAX))
            return f.read()

    save("serial.log", serial)
    if handle is None or lab.info() is None:
        return written
    try:
        ssh = lab.ssh(timeout=10)
    except Exception as e:  # noqa: BLE001 - the lab may be what broke
        reason = f"no SSH to dom0: {e}"  # `e` is unbound once the except block ends
        save("dom0.error", lambda: reason)
        return written
    with ssh:
        def cmd(command: str):
            return lambda: (lambda r: r.stdout + (f"\n[exit {r.exit_status}] {r.stderr}" if r.exit_status else ""))(ssh.run(command, timeout=60))

        save("xl-dmesg.txt", cmd("xl dmesg"))
        save("xl-list.txt", cmd("xl list -v"))
        save("dom0-dmesg.txt", cmd("dmesg | tail -n 400"))
        save("xenstore.txt", cmd("xenstore-ls -f -p"))
        names = ssh.run("ls /var/log/xen/console/ 2>/dev/null").stdout.split()
        for log in sorted(n for n in names if n.startswith("guest-") and n.endswith(".log")):
            save(f"console-{log[len('guest-'):]}", cmd(f"tail -c 1000000 /var/log/xen/console/{log} | grep -av '^XLR1 '"))
    return written


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and report.when in ("setup", "call") and _uses_lab(item):
        handle = getattr(item.config, _HANDLE, None)
        try:
            lab = handle.lab if handle is not None else _lab_from_options(item.config)
            folder = artifacts_dir(item.config, item.nodeid)
            files = save_artifacts(handle, lab, folder)
            text = f"saved in {folder}: {', '.join(files)}"
            item.user_properties.append((ARTIFACTS_KEY, str(folder)))
            if report.user_properties is not item.user_properties:
                report.user_properties.append((ARTIFACTS_KEY, str(folder)))
        except Exception as e:  # noqa: BLE001 - never hide the test's own failure
            text = f"could not save the lab's logs: {type(e).__name__}: {e}"
        report.sections.append(("xenlab artifacts", text))
    return report
