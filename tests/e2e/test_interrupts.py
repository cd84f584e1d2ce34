"""Commands killed with SIGKILL (no cleanup at all) at several points, on a
lab of their own restored from the session's snapshot: the next command
recovers, and nothing is left in dom0 after `guest destroy` (no domain, loop
device, vif, backend node or guest directory), nor a usable half-snapshot."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from xenlab.agent.facts import AGENT_RUNNING_DIR as RUNNING_DIR
from xenlab.agent.facts import DOM0_AGENT_ROOT, GUESTS_DIR, LOCK_DIR
from xenlab.lab import snapshot as snapshots
from xenlab.run import pid_alive, pids_using

from .conftest import xenlab

pytestmark = pytest.mark.own_labs  # boots labs of its own: under xdist, beside the session lab's tests

LAB = "e2e-kill"
XENLAB = [sys.executable, "-m", "xenlab"]


def signal_id(value) -> str | None:
    return value.name if isinstance(value, signal.Signals) else None


def killed_at(args: list[str], marker: str | None, delay: float, timeout: float = 300,
              sig: int = signal.SIGKILL, env: dict | None = None, hold=None) -> str:
    """Start `xenlab ARGS`, send it `sig` `delay` s after `marker` appears in its
    progress output (stderr; None: after the start) and wait for it to end;
    returns what it printed. Fails if it finished first. `hold`, when given,
    is called after the marker: it returns once the command is held inside
    the phase the test names (whatever the host's speed), and a callable to
    run once the signal is sent (or None)."""
    # SIGINT as a terminal sends it: a runner that started the suite in the
    # background (`cmd &` in a script) leaves SIGINT ignored in its children,
    # and Python then installs no KeyboardInterrupt handler.
    proc = subprocess.Popen(XENLAB + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = threading.Event()
    lines: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if marker is not None and marker in line:
                seen.set()

    if marker is None:
        seen.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    release = None
    try:
        assert seen.wait(timeout), f"{marker!r} never appeared: {''.join(lines)}"
        if hold is not None:
            release = hold(proc, lines)
        time.sleep(delay)
        assert proc.poll() is None, f"xenlab {' '.join(args)} finished before the kill: {''.join(lines)}"
        proc.send_signal(sig)
        if release is not None:
            release()
        proc.wait(timeout=120)  # after SIGINT/SIGTERM it cleans up first
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    reader.join(timeout=10)
    return "".join(lines)


def restore_held(lab_name: str):
    """A `hold` for killed_at: waits until libvirt, restoring the lab from its
    snapshot, first records the restore's job in the embedded driver's status
    file (before it has QEMU's pid: the record says pid 0), and stops the
    xenlab process right there (SIGSTOP), so the signal lands inside
    libvirt's restore job on any host. A kill there left that job recorded,
    and every later destroy of the domain waited on it
    (docs/reliability.md#interruptions). Returns the release (SIGCONT), for
    a signal the process is to handle."""
    from xenlab import Lab

    lab = Lab.open(lab_name)
    status = lab.embed_root / "run" / "qemu" / f"{lab.domain_name}.xml"
    before = status.read_text() if status.exists() else None

    def hold(proc, lines) -> object:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                record = status.read_text()
            except OSError:
                record = ""
            if record != before and "<job " in record:
                os.kill(proc.pid, signal.SIGSTOP)  # the xenlab command this test started
                return lambda: os.kill(proc.pid, signal.SIGCONT)
            assert proc.poll() is None, f"the restore finished before libvirt recorded its job: {''.join(lines)}"
            time.sleep(0.002)
        raise AssertionError(f"libvirt never recorded the restore's job in {status}: {''.join(lines)}")

    return hold


def held_in_dom0(condition: str, pid_of: str):
    """A `hold` for killed_at, made before the command starts: in dom0, a
    loop waits until the shell test `condition` holds, then stops (SIGSTOP)
    the process `pid_of` prints (xenlab's own agent there, found by its lock
    file or the agent server's record of it), so the host command is killed while dom0's
    side stands inside the phase the test names, on any host speed. The
    release (after the signal) lets that process go on (SIGCONT), as it
    would have gone on from there."""
    script = f"until {condition}; do sleep 0.05; done; pid=$({pid_of}); kill -STOP $pid && echo stopped $pid"
    waiter = subprocess.Popen(XENLAB + ["ssh", "--lab", LAB, "--", f"timeout 300 sh -c {shlex.quote(script)}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def hold(proc, lines) -> object:
        try:
            out, err = waiter.communicate(timeout=330)
        finally:
            if waiter.poll() is None:
                waiter.kill()
                waiter.wait()
        words = out.split()
        assert words[:1] == ["stopped"], f"dom0 never reached `{condition}` with a process to stop: {out}{err}{''.join(lines)}"
        return lambda: dom0(f"kill -CONT {words[1]}", check=False)

    return hold


def create_held(name: str, phase: str):
    """Hold a create of guest NAME in dom0 at `phase`: "xl-create" (its
    disks and xl.cfg made, `xl create` about to run) or "connecting" (the
    domain made, its devices not yet all Connected), by its create lock's pid."""
    made = {"xl-create": "xl.cfg", "connecting": "meta.json"}[phase]
    return held_in_dom0(f"test -e {GUESTS_DIR}/{name}/{made}", f"head -n1 {LOCK_DIR}/create-{name}.lock")


def dom0(command: str, check: bool = True) -> subprocess.CompletedProcess:
    return xenlab("ssh", "--lab", LAB, "--", command, check=check)


def assert_nothing_left(name: str) -> None:
    """No domain, loop device, guest directory, backend node or vif is left.
    One SSH round trip: each `xenlab ssh` costs a process start and a
    connection, and the tests here call this about 20 times."""
    out = dom0(
        f"echo @xl; xl list; echo @loop; losetup -a; echo @dir; test -e {GUESTS_DIR}/{name} && echo present; "
        "echo @domains; xenstore-list /local/domain; "
        "echo @vbd; xenstore-list /local/domain/0/backend/vbd 2>/dev/null; "
        "echo @vif; xenstore-list /local/domain/0/backend/vif 2>/dev/null; "
        "echo @net; ls /sys/class/net"
    ).stdout
    part: dict[str, str] = {}
    title = None
    for line in out.splitlines():
        if line.startswith("@"):
            title = line[1:]
            part[title] = ""
        elif title is not None:
            part[title] += line + "\n"
    assert set(part) == {"xl", "loop", "dir", "domains", "vbd", "vif", "net"}, out
    assert name not in part["xl"]
    assert f"guests/{name}/" not in part["loop"]
    assert "present" not in part["dir"]
    assert part["domains"].split() == ["0"], part["domains"]  # no domain, half-made or not, is left
    for kind in ("vbd", "vif"):
        assert part[kind].split() == [], (kind, part[kind])
    assert "vif" not in part["net"]


def processes_of_lab(name: str) -> list[str]:
    """Host processes whose command line names the lab's state directory
    (its QEMU, libvirt's capability probes for its embed root)."""
    found = []
    for proc in os.listdir("/proc"):
        try:
            cmdline = open(f"/proc/{proc}/cmdline", "rb").read()
        except OSError:
            continue
        if proc.isdigit() and f"/labs/{name}/".encode() in cmdline:
            words = cmdline.replace(bytes(1), b" ")[:200].decode(errors="replace")
            found.append(f"{proc}: {words}")
    return found


@pytest.fixture(scope="module")
def kill_lab(lab_info):
    xenlab("down", "--lab", LAB, check=False)
    xenlab("up", "--lab", LAB)
    try:
        yield LAB
    finally:
        xenlab("down", "--lab", LAB, check=False)
    # Whatever the kills left, `down` ends it: no QEMU of this lab, no lost probe.
    assert processes_of_lab(LAB) == []


@pytest.fixture(autouse=True)
def kill_lab_up_again(request):
    """After each test on the kill lab, that lab is up for the next one: a lab
    a test left stuck fails that test, not every test after it. When `down`
    and `up` cannot bring it back, its processes (found by the lab's state
    directory in their command lines) are ended by pid and its state removed."""
    yield
    if "kill_lab" not in request.fixturenames:
        return
    if json.loads(xenlab("status", "--lab", LAB, "--json").stdout)["state"] == "up":
        return
    if xenlab("down", "--lab", LAB, check=False, timeout=300).returncode == 0 and \
            xenlab("up", "--lab", LAB, check=False, timeout=600).returncode == 0:
        return
    from xenlab import Lab

    for line in processes_of_lab(LAB):
        os.kill(int(line.split(":")[0]), signal.SIGKILL)
    shutil.rmtree(Lab.open(LAB).dir, ignore_errors=True)
    xenlab("up", "--lab", LAB)


@pytest.mark.parametrize("sig,phase", [(signal.SIGKILL, "request"), (signal.SIGKILL, "xl-create"), (signal.SIGKILL, "connecting"),
                                       (signal.SIGINT, "connecting"), (signal.SIGTERM, "xl-create")], ids=signal_id)
@pytest.mark.full
def test_guest_create_killed_then_destroy_leaves_nothing(kill_lab, sig, phase):
    """`guest create` killed as it sends its request, or while dom0's create
    is held just before `xl create` or while the devices connect."""
    name = "gk"
    hold = None if phase == "request" else create_held(name, phase)
    out = killed_at(["guest", "create", "--lab", LAB, name, "--disk", "8M", "--net"], "xl create, wait for Connected", 0.0,
                    sig=sig, hold=hold)
    if sig != signal.SIGKILL:  # as Ctrl-C: the create undoes itself before it exits
        assert "interrupted" in out, out
        assert_nothing_left(name)
    # The next command sees whatever the kill left, and destroy removes it.
    listed = xenlab("guest", "list", "--lab", LAB, "--json").stdout
    result = xenlab("guest", "destroy", "--lab", LAB, name, check=False)
    assert result.returncode == 0 or "no guest named" in result.stderr, (out, listed, result.stderr)
    assert_nothing_left(name)
    # And the name and its address are free again.
    info = json.loads(xenlab("guest", "create", "--lab", LAB, name, "--disk", "8M", "--net", "--json").stdout)
    assert info["name"] == name and info["domid"] > 0
    xenlab("guest", "destroy", "--lab", LAB, name)
    assert_nothing_left(name)


@pytest.mark.full
@pytest.mark.parametrize("phase", ["start", "in-dom0"])
def test_guest_destroy_killed_then_destroy_again_leaves_nothing(kill_lab, phase):
    """`guest destroy` killed as it starts, or once dom0's destroy runs (held
    there): the next destroy finishes the job."""
    name = "gd"
    xenlab("guest", "create", "--lab", LAB, name, "--disk", "8M", "--net")
    # The agent server records what each of its requests runs (RUNNING_DIR/PID).
    hold = None if phase == "start" else held_in_dom0(f"grep -qs '^domctl destroy' {RUNNING_DIR}/*",
                                                       f"grep -ls '^domctl destroy' {RUNNING_DIR}/* | head -n1 | xargs basename")
    killed_at(["guest", "destroy", "--lab", LAB, name], None, 0.0, hold=hold)
    result = xenlab("guest", "destroy", "--lab", LAB, name, check=False)
    assert result.returncode == 0 or "no guest named" in result.stderr, result.stderr
    assert_nothing_left(name)


RESET_KILLS = [
    # (where, the marker of that phase, hold it there, signal); each kill lands inside its phase on any host.
    ("stop", "stop lab", False, signal.SIGKILL),
    ("restore", "restore snapshot", True, signal.SIGKILL),  # while libvirt's restore job runs
    ("answers", "dom0 answers", False, signal.SIGKILL),
    ("restore", "restore snapshot", True, signal.SIGTERM),
]


@pytest.mark.parametrize("where,marker,held,sig", [
    pytest.param(*kill, id=f"{kill[0]}-{kill[3].name}",
                 marks=[pytest.mark.gate] if kill[:2] == ("restore", "restore snapshot") and kill[3] == signal.SIGKILL else [pytest.mark.full])
    for kill in RESET_KILLS])
def test_reset_killed_then_up_and_down_recover(kill_lab, where, marker, held, sig):
    """`reset` killed while it stops the lab, inside libvirt's restore job
    (held there) or while dom0 is first asked:
    the next `up` brings the lab back, and `down` and `up` work after it."""
    killed_at(["reset", "--lab", LAB], marker, 0.0, sig=sig, hold=restore_held(LAB) if held else None)
    state = json.loads(xenlab("status", "--lab", LAB, "--json").stdout)["state"]
    assert state in ("down", "orphaned", "gone", "up"), state
    info = json.loads(xenlab("up", "--lab", LAB, "--json").stdout) if state != "up" else None
    status = json.loads(xenlab("status", "--lab", LAB, "--json").stdout)
    assert status["state"] == "up", status
    if info:
        assert pid_alive(info["qemu_pid"])
    assert "Domain-0" in dom0("xl list").stdout
    # What the kill left in libvirt is gone too: `down` stops the lab, and `up` restores it again.
    xenlab("down", "--lab", LAB, timeout=120)
    assert processes_of_lab(LAB) == []
    assert pid_alive(json.loads(xenlab("up", "--lab", LAB, "--json").stdout)["qemu_pid"])


@pytest.mark.full
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=signal_id)
def test_up_interrupted_while_booting_stops_its_vm_and_the_next_up_works(kill_lab, sig):
    xenlab("down", "--lab", LAB)
    out = killed_at(["up", "--lab", LAB, "--cold"], "boot Xen and dom0", 2.0, sig=sig)
    assert "interrupted" in out, out
    assert json.loads(xenlab("status", "--lab", LAB, "--json").stdout)["state"] == "down"
    assert processes_of_lab(LAB) == []  # its QEMU is gone, nothing left running
    info = json.loads(xenlab("up", "--lab", LAB, "--json").stdout)
    assert pid_alive(info["qemu_pid"]) and "Domain-0" in dom0("xl list").stdout


@pytest.mark.full
def test_up_killed_while_saving_its_snapshot_leaves_none_half_made(kill_lab):
    """A cold boot killed while it saves: no usable half-snapshot, and the next
    `up` works (restoring the snapshot that was there, or booting cold)."""
    xenlab("down", "--lab", LAB)
    before = {s["key"]: s for s in json.loads(xenlab("snapshot", "ls", "--json").stdout)}
    killed_at(["up", "--lab", LAB, "--cold"], "save snapshot", 0.5)
    after = json.loads(xenlab("snapshot", "ls", "--json").stdout)
    assert all(s["problem"] is None for s in after), after
    for snap in after:  # whatever is listed is whole: what was there, or the new one, published complete
        assert snap["key"] in before or snapshots.find(snap["key"]).problem() is None
    info = json.loads(xenlab("up", "--lab", LAB, "--json").stdout)
    assert pid_alive(info["qemu_pid"]) and "Domain-0" in dom0("xl list").stdout


def dom0_agents() -> list[str]:
    """xenlab's own processes in dom0 (agents, device channel backends)."""
    out = dom0(f"ps -eo pid=,args= | grep -F {DOM0_AGENT_ROOT} | grep -v grep || true").stdout
    return [line for line in out.splitlines() if line.strip()]


@pytest.mark.full
@pytest.mark.parametrize("check", ["guest.create", "devchan.echo"])
def test_verify_killed_then_verify_again_passes_leaving_nothing(kill_lab, check):
    """`verify` killed inside a check, held there in dom0: while its guest's
    devices connect, or while the device channel's backend serves the echo."""
    # The checks that leave nothing behind a kill, or run before the killed
    # one, are skipped in both runs (test_verify.py runs them): they took two
    # thirds of this test's time.
    skips = [arg for name in ("ring", "evtchn.catalogue", "evtchn.ping", "xenstore.perms", "xen.tools") for arg in ("--skip", name)]
    hold = create_held("verify", "connecting") if check == "guest.create" else \
        held_in_dom0(f"grep -qs '^devchan backend' {RUNNING_DIR}/*",
                     f"grep -ls '^devchan backend' {RUNNING_DIR}/* | head -n1 | xargs basename")
    killed_at(["verify", "--lab", LAB, *skips], f"> {check}", 0.0, hold=hold)
    # The next verify finds what the killed one left (its guest, a device
    # channel backend in dom0) and still passes.
    again = xenlab("verify", "--lab", LAB, *skips, check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    assert_nothing_left("verify")
    assert dom0_agents() == []


@pytest.mark.full
def test_build_killed_leaves_no_entry_and_the_next_build_sweeps_its_scratch(tmp_path):
    """`xenlab build` of the dom0 image, in a cache of its own: SIGTERM (as
    Ctrl-C) cleans up at once; SIGKILL leaves its scratch directory, and its
    mmdebstrap is stopped (it gets SIGTERM when xenlab dies) and unmounts the
    chroot; the next build removes that scratch before it starts its own.
    The first two kills land on mmdebstrap's own step lines (while apt
    downloads; while dpkg installs in the chroot), so inside its run on any
    host. The third build is stopped as its mmdebstrap starts: a whole image would
    cost two more minutes and is what every cold cache builds (the cache is
    keyed by the build's inputs, so a change to them builds it in CI)."""
    env = {**os.environ, "XENLAB_CACHE": str(tmp_path / "cache")}
    images = tmp_path / "cache" / "images"

    def scratch() -> list:
        return sorted(p.name for p in images.iterdir()) if images.exists() else []

    def mounts_below() -> list[str]:
        return [line for line in open("/proc/self/mounts") if str(tmp_path) in line]

    # Killed on mmdebstrap's own step lines (xenlab relays them), inside its
    # run on any host: while apt downloads, and while dpkg installs in the chroot.
    out = killed_at(["build"], "downloading packages with apt", 0.0, sig=signal.SIGTERM, env=env)
    assert scratch() == [] and mounts_below() == [], out
    killed_at(["build"], "installing essential packages", 0.0, env=env)
    left = scratch()
    assert len(left) == 1 and left[0].startswith("."), left  # only the scratch, no entry
    # mmdebstrap got SIGTERM when xenlab died; it lets apt and dpkg finish
    # their step, then cleans up and exits.
    deadline = time.monotonic() + 180
    while (pids_using(images) or mounts_below()) and time.monotonic() < deadline:
        time.sleep(1)
    assert pids_using(images) == [] and mounts_below() == []
    # The next build sweeps that scratch before its mmdebstrap starts.
    out = killed_at(["build"], "mmdebstrap", 0.0, sig=signal.SIGTERM, env=env)
    assert f"removed {images / left[0]}, left by an interrupted build" in out, out
    assert scratch() == [] and mounts_below() == [], out


def finished(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


@pytest.mark.full
def test_two_commands_on_one_lab_at_once_both_work(kill_lab):
    """Two `up`s of one lab at once: one boots, the other waits, says so, and
    returns the same lab; two `guest create`s at once both make their guest."""
    xenlab("down", "--lab", LAB)
    ups = [subprocess.Popen(XENLAB + ["up", "--lab", LAB, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
    results = [finished(p) for p in ups]
    assert [rc for rc, _, _ in results] == [0, 0], results
    infos = [json.loads(out) for _, out, _ in results]
    assert infos[0]["qemu_pid"] == infos[1]["qemu_pid"] and pid_alive(infos[0]["qemu_pid"])
    assert any("waiting for another xenlab command" in err for _, _, err in results), results
    assert json.loads(xenlab("status", "--lab", LAB, "--json").stdout)["state"] == "up"
    creates = [subprocess.Popen(XENLAB + ["guest", "create", "--lab", LAB, name, "--disk", "8M", "--net", "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("c1", "c2")]
    made = [finished(p) for p in creates]
    try:
        assert [rc for rc, _, _ in made] == [0, 0], made
        guests = {g["name"]: g for g in json.loads(xenlab("guest", "list", "--lab", LAB, "--json").stdout)}
        assert guests["c1"]["state"] == guests["c2"]["state"] == "running"
        assert guests["c1"]["ip"] != guests["c2"]["ip"]
    finally:
        for name in ("c1", "c2"):
            xenlab("guest", "destroy", "--lab", LAB, name, check=False)
    for name in ("c1", "c2"):
        assert_nothing_left(name)
