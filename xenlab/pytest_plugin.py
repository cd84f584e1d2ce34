"""pytest plugin (entry point pytest11 `xenlab`): the real lab for users' own
driver tests.

Fixtures:
    xenlab_lab            (session) the xenlab.Lab, booted once unless one of
                          that name is already up; stopped at the end only if
                          this session booted it and --xenlab-keep was not given
    xenlab_dom0           (session) xenlab.Dom0: run commands in dom0, copy
                          files in and out, and a XenStore client (`.xs`)
    xenlab_guest_factory  (function) make(...) -> a fresh xenlab.Guest for
                          this test, destroyed when the test ends
    xenlab_attach         (function) attach(guest, size, ...) -> a disk on the
                          Python block backend (or kernel blkback), detached at the end
    xenlab_reload         (function) reload(guest, ko, params) -> the module
                          swapped in a running guest, traced; stock again at the end
    xenlab_dom0_reload    (function) reload(ko, params) -> a backend module swapped
                          in dom0 under every guest it serves; Debian's again at the end
Marker: @pytest.mark.xenlab makes a test use the lab without naming a fixture.

When a test that uses the lab fails, the serial log, `xl dmesg`, `xl list`,
dom0's dmesg, every guest console, a XenStore dump and a page drawing every
device's XenBus states (xenbus-timeline.html) are saved in
<--xenlab-artifacts>/<test id>/ and the folder is named in the report.

The plugin is inert for tests that use neither a fixture nor the marker:
nothing from the lab side is even imported."""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from xenlab.api import Lab
    from xenlab.guest.handle import Guest

ARTIFACTS_KEY = "xenlab_artifacts"
_LAB = "_xenlab_lab"  # the session's Lab, set once the lab fixture ran
_DOM0 = "_xenlab_dom0"  # the session's Dom0 handle, once made
_RESET_AT = "_xenlab_reset_at"  # the module or test the lab state was last made fresh for
RESET_SCOPES = ("session", "module", "test")


def pytest_addoption(parser):
    group = parser.getgroup("xenlab", "xenlab: a real nested Xen lab")
    group.addoption("--xenlab-name", default=os.environ.get("XENLAB_NAME", "pytest"),
                    help="name of the lab the tests use; one already up is reused and left running (default: $XENLAB_NAME or 'pytest')")
    group.addoption("--xenlab-keep", action="store_true", help="leave the lab running after the session even if this session booted it")
    group.addoption("--xenlab-connect", default="", help="libvirt URI for booting the lab (default: embedded driver, no daemon); "
                    "under pytest -n N a comma-separated list that the workers are spread over, '' meaning the embedded driver")
    group.addoption("--xenlab-config", default=os.environ.get("XENLAB_CONFIG", ""), help="a TOML file over xenlab's defaults")
    group.addoption("--xenlab-artifacts", default="", help="where failed tests' logs go (default: <rootdir>/xenlab-artifacts)")
    group.addoption("--xenlab-xen", default="", metavar="FILE", help="boot the session's lab with this Xen (xen.gz or xen of your build)")
    group.addoption("--xenlab-dom0-kernel", default="", metavar="FILE", help="boot the session's lab with this dom0 kernel (bzImage or vmlinux)")
    group.addoption("--xenlab-dom0-modules", default="", metavar="DIR", help="with --xenlab-dom0-kernel: its modules_install tree")
    group.addoption("--xenlab-guest-kernel", default="", metavar="FILE",
                    help="default kernel of the guests tests make: minimal, debian, or your bzImage/vmlinux")
    group.addoption("--xenlab-guest-modules", default="", metavar="DIR", help="default --modules of the guests tests make")
    group.addoption("--xenlab-reset", default=os.environ.get("XENLAB_RESET", "session"), choices=RESET_SCOPES,
                    help="a fresh lab state (by `xenlab reset`: no guests, dom0 as after boot) before each module or each test; "
                         "each reset costs a snapshot restore, a few seconds (default: session, the lab is shared as it is)")
    group.addoption("--xenlab-load", action="append", default=[], metavar="'MODULE [PARAMS]'",
                    help="a module the guests tests make load at boot (repeatable, in order)")
    group.addoption("--xenlab-shard", default=os.environ.get("XENLAB_SHARD", ""), metavar="K/N",
                    help="run shard K (1..N) of N: each test goes to one shard by its id, the same on every runner "
                         "(a CI matrix of N runners, each with its own lab, covers the suite once)")


def shard_of(nodeid: str, shards: int) -> int:
    """The shard (1..shards) a test belongs to: by a stable hash of its id (not Python's salted hash)."""
    return int(hashlib.sha256(nodeid.encode()).hexdigest()[:8], 16) % shards + 1


def parse_shard(text: str) -> tuple[int, int]:
    k, sep, n = text.partition("/")
    if not (sep and k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
        raise pytest.UsageError(f"--xenlab-shard {text!r}: write K/N with 1 <= K <= N, e.g. 2/3")
    return int(k), int(n)


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--xenlab-shard"):
        return
    k, n = parse_shard(config.getoption("--xenlab-shard"))
    keep = [item for item in items if shard_of(item.nodeid, n) == k]
    config.hook.pytest_deselected(items=[item for item in items if shard_of(item.nodeid, n) != k])
    items[:] = keep


def pytest_configure(config):
    config.addinivalue_line("markers", "xenlab: the test needs the real Xen lab (booted once per session); failures save its logs")
    if xdist_worker(config) and config.getvalue("loadgroup"):
        config.pluginmanager.register(XdistGroups(), "xenlab-xdist-groups")


class XdistGroups:
    """`--dist loadgroup` with pytest >= 9.2: pytest-xdist (3.8) marks a
    test's group by rewriting `item._nodeid`, which pytest 9.2 no longer reads
    (a node's id is `item._id` now), so every group was spread over the
    workers. This adds the `@group` suffix xdist's scheduler groups by, on the
    workers, after xdist's own hook."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        for item in items:
            names = {str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")}
            suffix = "@" + "_".join(sorted(names))
            if names and not item.nodeid.endswith(suffix) and hasattr(item, "_id"):
                from _pytest.nodeid import coerce_node_id

                item._id = coerce_node_id(item.nodeid + suffix)


def _uses_lab(item) -> bool:
    return "xenlab_lab" in getattr(item, "fixturenames", ()) or item.get_closest_marker("xenlab") is not None


@pytest.fixture(autouse=True)
def _xenlab_marker(request):
    """@pytest.mark.xenlab: pull in the lab (tests without the marker pay
    nothing); with --xenlab-reset module|test, reset the lab first when this
    test starts a new module (or is a new test)."""
    if not _uses_lab(request.node):
        return
    lab = request.getfixturevalue("xenlab_lab")
    scope = request.config.getoption("--xenlab-reset")
    if scope == "session":
        return
    key = request.node.nodeid if scope == "test" else request.node.nodeid.split("::", 1)[0]
    last = getattr(request.config, _RESET_AT, None)
    if last is None and lab.booted:
        setattr(request.config, _RESET_AT, key)  # this session booted it: already fresh
        return
    if key != last:
        dom0 = getattr(request.config, _DOM0, None)
        if dom0 is not None:
            dom0.close()  # its SSH and XenStore connections went with the old VM; it reconnects
        from xenlab.lab import child as lab_child

        lab_child.call(lab.cfg, "reset")
        setattr(request.config, _RESET_AT, key)


# -- fixtures --------------------------------------------------------------------------

def xdist_worker(config) -> str:
    """The pytest-xdist worker id ('gw0', ...), or '' outside a `-n N` run."""
    return getattr(config, "workerinput", {}).get("workerid", "")


def lab_name(config) -> str:
    """The session's lab: --xenlab-name, with the xdist worker's id appended
    under `pytest -n N` (each worker boots and owns a lab of its own)."""
    worker = xdist_worker(config)
    name = config.getoption("--xenlab-name")
    return f"{name}-{worker}" if worker else name


def worker_uri(config) -> str:
    """This worker's libvirt URI: --xenlab-connect, or under xdist the entry
    of its comma-separated list for this worker (gw0 the first, gw1 the next, round robin)."""
    uris = config.getoption("--xenlab-connect").split(",")
    worker = xdist_worker(config)
    return uris[int(worker[2:]) % len(uris)] if worker.startswith("gw") else uris[0]


def _lab_from_options(config):
    from xenlab.api import Lab

    opt = config.getoption
    own = {"xen": opt("--xenlab-xen"), "dom0.kernel": opt("--xenlab-dom0-kernel"), "dom0.modules": opt("--xenlab-dom0-modules")}
    return Lab.open(lab_name(config), opt("--xenlab-config") or None, connect=worker_uri(config) or None,
                    **{key: str(Path(value).absolute()) for key, value in own.items() if value})


@contextmanager
def _first_boot_lock(config):
    """Under xdist, workers boot one at a time: the first builds what is
    missing and saves the booted lab's snapshot, the others then restore it
    (a few seconds) instead of each building and booting cold."""
    if not xdist_worker(config):
        yield
        return
    from xenlab.paths import state_root

    with open(state_root() / ".xdist-boot.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def xenlab_lab(request):
    """The lab (xenlab.Lab) for the whole session (for each xdist worker: its
    own); `.booted` says whether this session booted it. A failure to boot is
    an error of every test using it (never a skip), with the serial log's tail."""
    from xenlab.lab import child as lab_child

    lab = _lab_from_options(request.config)
    # Booted, reset and stopped in a child process: this one never holds the
    # lab's libvirt, so `xenlab debug gdb` and the other commands work on it
    # while the session runs (xenlab.lab.child).
    with _first_boot_lock(request.config):
        lab.booted = bool(lab_child.call(lab.cfg, "ensure_up"))
    lab.require_up()
    setattr(request.config, _LAB, lab)
    yield lab
    setattr(request.config, _LAB, None)
    if lab.booted and not request.config.getoption("--xenlab-keep"):
        lab_child.call(lab.cfg, "down")


@pytest.fixture(scope="session")
def xenlab_dom0(xenlab_lab, request):
    """xenlab.Dom0 of the session's lab: run, check, put, get, xs."""
    with xenlab_lab.dom0() as dom0:
        setattr(request.config, _DOM0, dom0)
        yield dom0
        setattr(request.config, _DOM0, None)


def guest_name(nodeid: str, n: int) -> str:
    """A valid guest name (1-32 of a-z 0-9 - _) from the test's name and a counter."""
    test = nodeid.rsplit("::", 1)[-1]
    slug = re.sub(r"[^a-z0-9]+", "-", test.lower().removeprefix("test_").removeprefix("test")).strip("-") or "t"
    # The slug may be cut short (parametrized ids differ at the end): a digest keeps tests apart.
    suffix = f"-{hashlib.sha1(nodeid.encode()).hexdigest()[:4]}-{n}"
    return ("pt-" + slug)[: 32 - len(suffix)].rstrip("-") + suffix


@pytest.fixture
def xenlab_guest_factory(xenlab_lab: Lab, request: pytest.FixtureRequest) -> Iterator[Callable[..., Guest]]:
    """make(name=None, *, memory="128M", vcpus=1, disks=(), net=False, root="busybox",
    kernel=None, modules=None, load=None, add=(), timeout=None, extra="") -> xenlab.Guest.
    kernel, modules and load default to --xenlab-guest-kernel (else "minimal"),
    --xenlab-guest-modules and --xenlab-load. Each guest is this test's own
    and is destroyed when the test ends (pass or fail)."""
    from xenlab.config import parse_mib
    from xenlab.errors import XenlabError
    from xenlab.guest.spec import DiskSpec, GuestSpec

    guests = xenlab_lab.guests()
    made: list[str] = []

    opt = request.config.getoption

    def make(name: str | None = None, *, memory: str | int = "128M", vcpus: int = 1, disks=(), net: bool = False,
             root: str = "busybox", kernel: str | None = None, modules: str | None = None, load=None, add=(),
             timeout: float | None = None, extra: str = ""):
        name = name or guest_name(request.node.nodeid, len(made) + 1)
        spec = GuestSpec(
            name=name, memory=memory if isinstance(memory, int) else parse_mib(memory, "memory"), vcpus=vcpus,
            disks=tuple(d if isinstance(d, DiskSpec) else DiskSpec.parse(d) for d in disks),
            net=net, kernel=str(kernel or opt("--xenlab-guest-kernel") or "minimal"), root=root, timeout=timeout, extra=extra,
            modules=str(modules if modules is not None else opt("--xenlab-guest-modules")),
            load=tuple(load if load is not None else opt("--xenlab-load")), add=tuple(add),
        ).validate()
        if any(g["name"] == name and g["state"] != "gone" for g in guests.list()):
            guests.destroy(name)  # a leftover of an interrupted earlier run
        made.append(name)  # before create: a create that fails half-way is still cleaned up
        return guests.start(spec)

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


@pytest.fixture
def xenlab_attach():
    """attach(guest, size="16M", *, backend="python", faults="", readonly=False,
    vdev="") -> xenlab.AttachedDisk: a new disk Connected in the guest's
    blkfront, served by xenlab's Python block backend (with a fault plan, to
    test a frontend's hardening) or by kernel blkback. Disks still attached
    when the test ends are detached; `disk.detach()` returns the backend's
    report (requests, errors, faults_fired) for the test to check."""
    from xenlab.errors import XenlabError

    disks = []

    def attach(guest, size: str = "16M", *, backend: str = "python", faults: str = "", readonly: bool = False, vdev: str = ""):
        disk = guest.attach_disk(size, backend=backend, readonly=readonly, faults=faults, vdev=vdev)
        disks.append(disk)
        return disk

    yield attach
    for disk in disks:
        try:
            disk.detach()
        except XenlabError as e:
            if "no running guest" not in e.message and "has no attached disk" not in e.message:
                raise


@pytest.fixture
def xenlab_reload(xenlab_lab: Lab):
    """reload(guest, ko, params="") -> dict: swap a kernel module in a running
    guest (`xenlab guest module GUEST reload`): the devices it drives close
    down and come up again under the new module, traced (the result's
    `devices`, `violation` and `kernel_log`). Each module a test swapped in
    is swapped back to the guest's stock one when the test ends, so the next
    test starts from stock."""
    from xenlab.drivers.guest import change
    from xenlab.errors import XenlabError

    guests = xenlab_lab.guests()
    swapped: list[tuple[str, str]] = []

    def reload(guest, ko: str | Path, params: str = "") -> dict:
        name = getattr(guest, "name", guest)
        result = change(guests, name, "reload", path=str(ko), params=params)
        swapped.append((name, result["module"]))
        return result

    yield reload
    try:
        for name, module in reversed(swapped):
            try:
                change(guests, name, "restore", module=module)
            except XenlabError as e:
                if "no running guest" not in e.message and "no stock module" not in e.message:
                    raise
    finally:
        guests.close()


@pytest.fixture
def xenlab_dom0_reload(xenlab_lab: Lab):
    """reload(ko, params="") -> dict: swap a backend module in dom0 (`xenlab
    dom0 module reload`): every guest device it serves closes down and comes
    up again under the new module, traced. Each backend a test swapped is
    Debian's own again when the test ends."""
    from xenlab.drivers.dom0 import change

    guests = xenlab_lab.guests()
    swapped: list[str] = []

    def reload(ko: str | Path, params: str = "") -> dict:
        result = change(guests, "reload", path=str(ko), params=params)
        swapped.append(result["module"])
        return result

    yield reload
    try:
        for module in dict.fromkeys(reversed(swapped)):
            change(guests, "restore", module=module)
    finally:
        guests.close()


# -- artifacts of failed tests ----------------------------------------------------------

def artifacts_dir(config, nodeid: str) -> Path:
    root = config.getoption("--xenlab-artifacts")
    base = Path(root) if root else Path(config.rootpath) / "xenlab-artifacts"
    return base / re.sub(r"[^A-Za-z0-9._-]+", "_", nodeid).strip("_")[:150]


def _where(config) -> str:
    worker = xdist_worker(config)
    return f"lab {lab_name(config)}" + (f", xdist worker {worker}" if worker else "")




@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and report.when in ("setup", "call") and _uses_lab(item):
        from xenlab.diagnostics import save_artifacts

        lab = getattr(item.config, _LAB, None)
        try:
            folder = artifacts_dir(item.config, item.nodeid)
            files = save_artifacts(lab or _lab_from_options(item.config), folder, lab_up=lab is not None)
            (folder / "where.txt").write_text(f"{_where(item.config)}\ntest {item.nodeid}\n")
            text = f"{_where(item.config)}: saved in {folder}: {', '.join(files + ['where.txt'])}"
            item.user_properties.append((ARTIFACTS_KEY, str(folder)))
            if report.user_properties is not item.user_properties:
                report.user_properties.append((ARTIFACTS_KEY, str(folder)))
        except Exception as e:  # noqa: BLE001 - never hide the test's own failure
            text = f"could not save the lab's logs: {type(e).__name__}: {e}"
        report.sections.append(("xenlab artifacts", text))
    return report
