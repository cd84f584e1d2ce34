"""dom0 side of `xenlab guest ...`: create, destroy, list, console, exec
(consoleexec.py) and cores, for PV, PVH and HVM domUs, run in dom0 as
`python3 -m xenlab_agent.domctl VERB`.

One SSH round trip per verb: the waiting (XenBus states, the guest's
readiness line, teardown) happens here, next to xenstored. Replies are JSON
on stdout; a refusal is reported as every agent error is (errors.report)."""

from __future__ import annotations

import base64
import fcntl
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from . import facts
from .cmdline import run_main
from .consoleexec import exec_in, stream_frame
from .domains import CONNECTED, Refused, console_tail, console_text, devices, domid_of, guest_dir, read_meta, xl
from .errors import ADDRESS_TAKEN, CRASHED_STARTING, AgentError
from .facts import CONSOLE_LOG, CORES_DIR, GUESTS_DIR, LOCK_DIR, XEN_TRIPLE_FAULT, state_name
from .facts import GUEST_PANIC_PATTERNS as CRASH_PATTERNS
from .facts import GUEST_READY_MARK as READY_MARK
from .sysutil import atomic_write, pid_alive
from .xl import parse_xl_info, parse_xl_list
from .xs import XenStore

ADDRESSES_DIR = os.path.join(GUESTS_DIR, ".addresses")  # one file per address in use, naming its guest



# -- create ----------------------------------------------------------------



def _create_lock_path(name: str) -> str:
    return f"{LOCK_DIR}/create-{name}.lock"


def _creating_lock(name: str, blocking: bool):
    """The file a create of NAME holds locked (with its pid in it) while it runs."""
    os.makedirs(LOCK_DIR, exist_ok=True)
    f = open(_create_lock_path(name), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        f.close()
        return None
    return f


def _stop_create(name: str, timeout: float) -> None:
    """A create of NAME still running (its caller was interrupted, or killed)
    is told to stop, and undoes itself, before a destroy goes on: otherwise
    its hotplug scripts could attach a loop device after the destroy looked."""
    held = _creating_lock(name, blocking=False)
    if held is not None:
        held.close()
        return
    try:
        with open(_create_lock_path(name)) as f:
            os.kill(int(f.read().split()[0]), signal.SIGTERM)
    except (OSError, ValueError, IndexError):
        pass
    deadline = time.monotonic() + timeout
    while (held := _creating_lock(name, blocking=False)) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if held is not None:
        held.close()


def _interrupted(signum, frame):
    raise Refused("interrupted (a destroy of this guest, or SIGTERM)")


def create(spec: dict) -> dict:
    name = spec["name"]
    lock = _creating_lock(name, blocking=True)
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    # Stopped as by a failure: the domain, its devices and files are removed.
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        return _create(spec)
    finally:
        lock.close()


def _create(spec: dict) -> dict:
    name = spec["name"]
    if domid_of(name) is not None:
        raise Refused(f"guest {name!r} is already running", f"destroy it first (`xenlab guest destroy {name}`) or pick another name")
    gdir = guest_dir(name)
    shutil.rmtree(gdir, ignore_errors=True)  # a leftover of a guest that is gone
    os.makedirs(GUESTS_DIR, exist_ok=True)
    need = sum(d["size_mib"] for d in spec["disks"]) + 64
    free = shutil.disk_usage(GUESTS_DIR).free // (1 << 20)
    if need > free:
        raise Refused(
            f"the disks of guest {name!r} need {need - 64} MiB but dom0 has only {free} MiB free under {GUESTS_DIR}",
            "use smaller --disk sizes or destroy other guests",
        )
    free_xen = int(_xl_info().get("free_memory", 0))
    if spec["memory"] > free_xen:
        raise Refused(f"guest {name!r} asks for {spec['memory']} MiB but Xen has {free_xen} MiB free", "give it less --memory or destroy other guests")
    started = time.monotonic()
    os.makedirs(gdir)
    domid = None
    try:
        claim_address(spec["ip"], name)
        for disk in spec["disks"]:
            with open(disk["path"], "wb") as f:
                f.truncate(disk["size_mib"] << 20)
        cfg = os.path.join(gdir, "xl.cfg")
        with open(cfg, "w") as f:
            f.write(spec["config"])
        log = CONSOLE_LOG.format(name=name)
        if os.path.exists(log):
            os.unlink(log)
        t0 = time.monotonic()
        xl("create", "-q", cfg, timeout=spec["timeout"])
        xl_seconds = time.monotonic() - t0
        domid = domid_of(name)
        if domid is None:
            raise Refused(f"guest {name!r} died right after `xl create`\n--- console ---\n{console_tail(name)}")
        meta = {k: spec[k] for k in ("name", "memory", "vcpus", "root", "kernel", "ip", "mac", "disks", "net", "hotplug")}
        meta.update(kernel_file=spec.get("kernel_file", ""), symbol_map=spec.get("symbol_map", ""))
        meta.update(domid=domid, created_at=time.time())
        atomic_write(os.path.join(gdir, "meta.json"), json.dumps(meta))  # `list` and destroy read it meanwhile
        with XenStore() as store:
            timings = _wait_up(store, name, domid, spec, t0)
            timings["xl_create"] = round(xl_seconds, 2)
            timings["total"] = round(time.monotonic() - started, 2)
            return {**meta, "timings": timings, "devices": devices(store, domid)}
    except BaseException as e:
        # A guest that panicked while starting leaves its core, as one that
        # crashes later does; then nothing half-made stays: the domain, its
        # backends, its files, its address.
        if isinstance(e, Refused) and e.code == CRASHED_STARTING and domid is not None:
            e.detail["core"] = _core_of_panicked(name, domid)
        _remove(name, domid if domid is not None else domid_of(name), 30)
        raise


def _xl_info() -> dict:
    return parse_xl_info(xl("info").stdout)


def xen_said_why(domid: int) -> str:
    """What Xen logged when it shut the domain down by itself (an HVM/PVH
    guest's triple fault), as ' (Xen: ...)'; '' when it said nothing."""
    log = xl("dmesg", check=False, timeout=30).stdout
    said = [line.split("] ", 1)[-1] for line in log.splitlines() if re.search(rf"\bd{domid}v\d+ {XEN_TRIPLE_FAULT}", line)]
    return f" (Xen: {said[-1].strip()})" if said else ""


def _wait_up(store: XenStore, name: str, domid: int, spec: dict, t0: float) -> dict:
    """Until every vbd/vif is Connected on both sides (of a kind whose stock
    frontend is kept off: its backend in InitWait) and the guest printed its
    readiness line; a panic or a vanished domain fails at once."""
    want = len(spec["disks"]) + (1 if spec["net"] else 0)
    unattended = {facts.STOCK_FRONTEND_KINDS.get(m) for m in spec.get("no_stock", ())}
    deadline = t0 + spec["timeout"]
    connected_at = ready_at = None
    while time.monotonic() < deadline:
        devs = devices(store, domid)
        if connected_at is None and len(devs) == want and all(
            d["backend_state"] == str(facts.INITWAIT) if d["kind"] in unattended else
            d["frontend_state"] == CONNECTED and d["backend_state"] == CONNECTED for d in devs
        ):
            connected_at = time.monotonic()
        text = console_text(name)
        if ready_at is None and READY_MARK in text:
            ready_at = time.monotonic()
        if connected_at and ready_at:
            return {"connected": round(connected_at - t0, 2), "ready": round(ready_at - t0, 2)}
        crash = next((m.group(0) for p in CRASH_PATTERNS if (m := p.search(text))), None)
        if crash or store.try_read(f"/local/domain/{domid}/name") is None:
            why = f"crashed: {crash}" if crash else "vanished" + xen_said_why(domid)
            # The kernel's own panic (not the init's mark for a module that did not load): keep its core.
            panicked = crash is not None and CRASH_PATTERNS[0].search(text) is not None
            raise Refused(f"guest {name!r} {why} while starting\n--- console ---\n{console_tail(name)}",
                          code=CRASHED_STARTING if panicked else "")
        time.sleep(0.02)
    states = ", ".join(f"{d['kind']}/{d['devid']} front {state_name(d['frontend_state'])} back {state_name(d['backend_state'])}" for d in devices(store, domid))
    raise Refused(
        f"guest {name!r} was not up after {spec['timeout']:.0f} s (devices: {states or 'none'}; "
        f"ready line {'seen' if ready_at else 'not seen'})\n--- console ---\n{console_tail(name)}",
        "raise --timeout on a slow host, or look at `xenlab guest console`",
    )


# -- destroy ---------------------------------------------------------------

def leftovers(store: XenStore, domid: int, name: str) -> dict:
    """What a domain can leave in dom0: backend nodes, loop devices, vifs."""
    backends = [
        f"/local/domain/0/backend/{kind}/{domid}" for kind in store.try_directory("/local/domain/0/backend")
        if str(domid) in store.try_directory(f"/local/domain/0/backend/{kind}")
    ]
    gdir = guest_dir(name)
    loops = []
    for backing in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(backing) as f:
                path = f.read().strip()
        except OSError:
            continue
        if path.startswith(gdir + "/"):
            loops.append(f"/dev/{backing.split('/')[3]} -> {path}")
    vifs = sorted(os.path.basename(p) for p in glob.glob(f"/sys/class/net/vif{domid}.*"))
    return {"backend_nodes": backends, "loop_devices": loops, "vifs": vifs}


def destroy(name: str, timeout: float) -> dict:
    _stop_create(name, timeout)
    domid = domid_of(name)
    meta = read_meta(name)
    if domid is None and meta is None:
        raise Refused(f"no guest named {name!r}", "see `xenlab guest list`")
    # A crashed guest is kept (on_crash = "preserve") for this: its core, before
    # it goes; one taken already (a failed test's artifacts) is not taken again.
    core = before = None
    if domid is not None and _crashed(domid):
        before = _core_records(name, domid)
        core = None if before else dump_core(name)
    if domid is None:
        assert meta is not None  # refused above when both are missing
        domid = meta["domid"]
    t0 = time.monotonic()
    left = _remove(name, domid, timeout)
    for record in _core_records(name, domid):
        os.unlink(record)
    return {"name": name, "domid": domid, "seconds": round(time.monotonic() - t0, 2), "leftovers": left,
            **({"core": core} if core else {}), **({"core_taken_before": True} if before else {})}


def _core_of_panicked(name: str, domid: int, settle: float = 10.0) -> dict | None:
    """The core of a guest whose console showed a panic, once Xen has it
    crashed (the kernel prints the panic before it tells Xen); None when none
    could be taken (the error says so)."""
    deadline = time.monotonic() + settle
    while not _crashed(domid) and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        taken = dump_core(name)
    except (AgentError, OSError, subprocess.SubprocessError):
        return None
    if taken.get("crashed"):
        os.unlink(taken["core"] + ".json")  # its record goes with the domain; the host fetches the core now
    return taken


def _crashed(domid: int) -> bool:
    return any(d["id"] == domid and "c" in d["state"] for d in parse_xl_list(xl("list").stdout))


def dump_core(name: str) -> dict:
    """`xl dump-core` of a guest (running ones are paused meanwhile), with
    what the host needs to read it: the kernel it runs and its System.map."""
    domid = domid_of(name)
    if domid is None:
        raise Refused(f"no running guest named {name!r}", "see `xenlab guest list`")
    os.makedirs(CORES_DIR, exist_ok=True)
    path = os.path.join(CORES_DIR, f"{name}-{domid}-{int(time.time())}.core")
    t0 = time.monotonic()
    xl("dump-core", name, path, timeout=600)
    meta = read_meta(name) or {}
    crashed = _crashed(domid)
    taken = {"name": name, "domid": domid, "core": path, "bytes": os.path.getsize(path),
             "seconds": round(time.monotonic() - t0, 2), "crashed": crashed,
             "kernel_file": meta.get("kernel_file", ""), "symbol_map": meta.get("symbol_map", "")}
    if crashed:  # a crashed guest's state no longer changes: this core is its core
        atomic_write(path + ".json", json.dumps(taken))
    return taken


def _core_records(name: str, domid: int) -> list[str]:
    """The records of cores dump_core took of this crashed guest (the cores
    themselves go once the host fetched them)."""
    return glob.glob(os.path.join(CORES_DIR, f"{glob.escape(name)}-{domid}-*.core.json"))


def _remove(name: str, domid: int | None, timeout: float) -> dict:
    """Destroy the domain, wait until dom0 holds nothing of it (up to timeout),
    remove its files and address; what was still left."""
    deadline = time.monotonic() + timeout
    _teardown(name)
    _wait_disk_backends(name, deadline)
    left = {}
    if domid is not None:
        with XenStore() as store:
            left = leftovers(store, domid, name)
            while any(left.values()) and time.monotonic() < deadline:
                time.sleep(0.05)
                left = leftovers(store, domid, name)
            if left["loop_devices"]:
                # A block hotplug script stopped between losetup and telling
                # XenStore: no backend will ever detach these.
                for loop in left["loop_devices"]:
                    subprocess.run(["losetup", "-d", loop.split()[0]], capture_output=True)
                left = leftovers(store, domid, name)
    shutil.rmtree(guest_dir(name), ignore_errors=True)
    release_addresses(name)
    return left


def _wait_disk_backends(name: str, deadline: float) -> None:
    """The Python block backends of disks attached to the guest (blkback.py)
    end by themselves once its domain is gone: wait for that, so a destroy
    returns with no process of the guest's left; past the deadline, kill them."""
    folder = os.path.join(guest_dir(name), facts.ATTACHED_DIR)
    pids = []
    for record in glob.glob(os.path.join(folder, "xvd?.json")):  # attached now (not .detached.json)
        try:
            with open(record) as f:
                pid = json.load(f).get("pid")
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                ours = b"blkback" in f.read()  # not a process that reused the number
        except (OSError, ValueError, TypeError):
            continue
        if ours and pid_alive(pid):
            pids.append(pid)
    while pids and time.monotonic() < deadline:
        time.sleep(0.05)
        pids = [p for p in pids if pid_alive(p)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it ended meanwhile


def claim_address(ip: str, name: str) -> None:
    """Take the guest's address for it, atomically: two creates at once that
    picked the same address must not both get it (the second is refused and
    the host picks again)."""
    os.makedirs(ADDRESSES_DIR, exist_ok=True)
    claim = os.path.join(ADDRESSES_DIR, ip)
    try:
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        with open(claim) as f:
            owner = f.read().strip()
        if owner != name and os.path.isdir(guest_dir(owner)):
            raise Refused(f"address {ip} is taken by guest {owner!r}", "another create picked it at the same time: pick again",
                          code=ADDRESS_TAKEN, detail={"address": ip}) from None
        fd = os.open(claim, os.O_WRONLY | os.O_TRUNC)  # a leftover of a guest that is gone
    with os.fdopen(fd, "w") as f:
        f.write(name)


def release_addresses(name: str) -> None:
    for ip in os.listdir(ADDRESSES_DIR) if os.path.isdir(ADDRESSES_DIR) else []:
        try:
            with open(os.path.join(ADDRESSES_DIR, ip)) as f:
                if f.read().strip() == name:
                    os.unlink(os.path.join(ADDRESSES_DIR, ip))
        except OSError:
            pass


def _teardown(name: str) -> None:
    if domid_of(name) is not None:
        xl("destroy", name, check=False)


# -- list ------------------------------------------------------------------

def list_guests() -> list[dict]:
    running = {d["name"]: {"domid": d["id"], "memory": d["memory_mib"], "vcpus": d["vcpus"], "xl_state": d["state"]}
               for d in parse_xl_list(xl("list").stdout)}
    names = sorted(n for n in os.listdir(GUESTS_DIR) if not n.startswith(".")) if os.path.isdir(GUESTS_DIR) else []
    out = []
    for name in names:
        meta = read_meta(name) or {"name": name}
        live = running.get(name)
        state = "gone"
        if live:
            state = "crashed" if "c" in live["xl_state"] else "running"
            meta.update(live)
        out.append({**meta, "state": state})
    return out


# -- entry point -------------------------------------------------------------
# `python3 -m xenlab_agent.domctl VERB [NAME] [--option value]` (cmdline.run_main);
# create and exec read their request as JSON on stdin.

def create_cmd() -> dict:
    return create(json.load(sys.stdin))


def destroy_cmd(name: str, timeout: float = 30.0) -> dict:
    return destroy(name, timeout)


def exec_cmd(name: str) -> dict:
    """{"script", "stdin_b64", "timeout", "stream"} on stdin; streamed, the
    output goes out as it comes and only the exit code is left to say."""
    req = json.load(sys.stdin)
    streamed = bool(req.get("stream"))
    result = exec_in(name, req["script"], base64.b64decode(req.get("stdin_b64", "")), req.get("timeout", 120),
                     on_chunk=stream_frame if streamed else None)
    return {"rc": result["rc"]} if streamed else result


def console_cmd(name: str, lines: int = 40) -> dict:
    if domid_of(name) is None and read_meta(name) is None and not console_text(name):
        raise Refused(f"no guest named {name!r}", "see `xenlab guest list`")
    return {"name": name, "log": CONSOLE_LOG.format(name=name), "tail": console_tail(name, lines)}


def leftovers_cmd(domid: int, name: str) -> dict:
    with XenStore() as store:
        return leftovers(store, domid, name)


COMMANDS = {"create": create_cmd, "destroy": destroy_cmd, "list": list_guests, "exec": exec_cmd, "console": console_cmd,
            "dump-core": dump_core, "leftovers": leftovers_cmd}


def main(argv: list[str] | None = None) -> int:
    return run_main(COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
