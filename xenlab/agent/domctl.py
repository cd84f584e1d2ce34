"""dom0 side of `xenlab guest ...`: create, destroy, list, exec and console
for PV domUs, run in dom0 as `python3 -m xenlab_agent.domctl VERB`.

One SSH round trip per verb: the waiting (XenBus states, the guest's
readiness line, teardown) happens here, next to xenstored. Replies are JSON
on stdout; a refusal is reported as every agent error is (errors.report)."""

from __future__ import annotations

import argparse
import base64
import fcntl
import glob
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import termios
import time
import tty

from . import facts
from .errors import ADDRESS_TAKEN, AgentError, report
from .facts import CONSOLE_LOG, CORES_DIR, EXEC_CHUNK_TAG, EXEC_END_TAG, EXEC_REPLY_TAG, EXEC_REQUEST_TAG, GUESTS_DIR, XEN_TRIPLE_FAULT, state_name
from .facts import GUEST_PANIC_PATTERNS as CRASH_PATTERNS
from .facts import GUEST_READY_MARK as READY_MARK
from .sysutil import pid_alive
from .xl import parse_xl_list
from .xs import XenStore

CONNECTED = str(facts.CONNECTED)  # as XenStore holds it
ADDRESSES_DIR = os.path.join(GUESTS_DIR, ".addresses")  # one file per address in use, naming its guest


class Refused(AgentError):
    pass


def xl(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(["xl", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise Refused(f"`xl {' '.join(args)}` failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
    return proc


def domid_of(name: str) -> int | None:
    proc = xl("domid", name, check=False)
    return int(proc.stdout) if proc.returncode == 0 and proc.stdout.strip().isdigit() else None


def guest_dir(name: str) -> str:
    return os.path.join(GUESTS_DIR, name)


def read_meta(name: str) -> dict | None:
    try:
        with open(os.path.join(guest_dir(name), "meta.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def devices(store: XenStore, domid: int) -> list[dict]:
    """Every frontend of the domain with its backend and both states."""
    out = []
    base = f"/local/domain/{domid}/device"
    for kind in store.try_directory(base):
        if kind not in ("vbd", "vif"):
            continue  # the console is not a XenBus split device here
        for devid in store.try_directory(f"{base}/{kind}"):
            front = f"{base}/{kind}/{devid}"
            back = store.try_read(f"{front}/backend") or ""
            out.append({
                "kind": kind, "devid": devid, "frontend": front, "backend": back,
                "frontend_state": store.try_read(f"{front}/state"),
                "backend_state": store.try_read(f"{back}/state") if back else None,
            })
    return out


def console_text(name: str) -> str:
    try:
        with open(CONSOLE_LOG.format(name=name), "rb") as f:
            return f.read().decode(errors="replace").replace("\r", "")
    except FileNotFoundError:
        return ""


def console_tail(name: str, lines: int = 25) -> str:
    text = [line for line in console_text(name).splitlines() if not line.startswith((EXEC_REPLY_TAG + " ", EXEC_CHUNK_TAG + " "))]
    return "\n".join(text[-lines:])


# -- create ----------------------------------------------------------------

LOCK_DIR = "/run/xenlab"  # dom0's per-guest locks: one create, one console request at a time


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
        with open(os.path.join(gdir, "meta.json"), "w") as f:
            json.dump(meta, f)
        with XenStore() as store:
            timings = _wait_up(store, name, domid, spec, t0)
            timings["xl_create"] = round(xl_seconds, 2)
            timings["total"] = round(time.monotonic() - started, 2)
            return {**meta, "timings": timings, "devices": devices(store, domid)}
    except BaseException:
        # Nothing half-made stays: the domain, its backends, its files, its address.
        _remove(name, domid if domid is not None else domid_of(name), 30)
        raise


def _xl_info() -> dict:
    out = {}
    for line in xl("info").stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def xen_said_why(domid: int) -> str:
    """What Xen logged when it shut the domain down by itself (an HVM/PVH
    guest's triple fault), as ' (Xen: ...)'; '' when it said nothing."""
    log = xl("dmesg", check=False, timeout=30).stdout
    said = [line.split("] ", 1)[-1] for line in log.splitlines() if re.search(rf"\bd{domid}v\d+ {XEN_TRIPLE_FAULT}", line)]
    return f" (Xen: {said[-1].strip()})" if said else ""


def _wait_up(store: XenStore, name: str, domid: int, spec: dict, t0: float) -> dict:
    """Until every vbd/vif is Connected on both sides and the guest printed
    its readiness line; a panic or a vanished domain fails at once."""
    want = len(spec["disks"]) + (1 if spec["net"] else 0)
    deadline = t0 + spec["timeout"]
    connected_at = ready_at = None
    while time.monotonic() < deadline:
        devs = devices(store, domid)
        if connected_at is None and len(devs) == want and all(
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
            raise Refused(f"guest {name!r} {why} while starting\n--- console ---\n{console_tail(name)}")
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
        with open(path + ".json", "w") as f:
            json.dump(taken, f)
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
        os.kill(pid, signal.SIGKILL)


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


# -- exec over the console ---------------------------------------------------

def exec_in(name: str, script: str, stdin: bytes, timeout: float, on_chunk=None) -> dict:
    """Send one request to the guest's exec agent on hvc0 and wait for its reply.
    Output comes in pieces while the command runs; each goes to
    on_chunk(fd, bytes) when given, and all of it into the result."""
    domid = domid_of(name)
    if domid is None:
        raise Refused(f"no running guest named {name!r}", "see `xenlab guest list`")
    with XenStore() as store:
        tty_path = store.try_read(f"/local/domain/{domid}/console/tty")
    if not tty_path:
        raise Refused(f"guest {name!r} has no console pty (xenconsoled not attached)")
    os.makedirs(LOCK_DIR, exist_ok=True)
    with open(f"{LOCK_DIR}/console-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one request at a time on a console
        fd = os.open(tty_path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            tty.setraw(fd)
            termios.tcflush(fd, termios.TCIFLUSH)
            req_id = secrets.token_hex(6)
            stdin_field = base64.b64encode(stdin).decode() if stdin else "-"
            frame = f"\n{EXEC_REQUEST_TAG} {req_id} {base64.b64encode(script.encode()).decode()} {stdin_field}\n".encode()
            _write_all(fd, frame, timeout)
            # A piece is whole once its line ends; the final reply (from older
            # agents with all the output in it) closes the request.
            answer = re.compile(rf"{EXEC_CHUNK_TAG} {req_id} ([12]) ([A-Za-z0-9+/=]*)[\r\n]|"
                                rf"{EXEC_REPLY_TAG} {req_id} (\d+) ([A-Za-z0-9+/=-]*) ([A-Za-z0-9+/=-]*) {EXEC_END_TAG}".encode())
            output = {1: bytearray(), 2: bytearray()}

            def take(fdno: int, piece: bytes) -> None:
                output[fdno] += piece
                if on_chunk is not None:
                    on_chunk(fdno, piece)

            buf = bytearray()
            deadline = time.monotonic() + timeout
            while True:
                consumed = 0
                for m in answer.finditer(buf):
                    consumed = m.end()
                    if m.group(1):
                        take(int(m.group(1)), base64.b64decode(m.group(2)))
                        continue
                    for fdno, field in ((1, m.group(4)), (2, m.group(5))):
                        if field != b"-" and field:
                            take(fdno, base64.b64decode(field))
                    return {"rc": int(m.group(3)), "stdout": base64.b64encode(output[1]).decode(), "stderr": base64.b64encode(output[2]).decode()}
                del buf[:consumed]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Refused(f"guest {name!r} did not answer within {timeout:.0f} s", "the command may still run; see `xenlab guest console`")
                if select.select([fd], [], [], min(left, 0.5))[0]:
                    try:
                        buf += os.read(fd, 1 << 16)
                    except BlockingIOError:
                        pass
        finally:
            os.close(fd)


def stream_frame(fd: int, piece: bytes) -> None:
    """`exec` with "stream": a piece of output as one line on stdout (O or E, base64)."""
    sys.stdout.write(f"{'O' if fd == 1 else 'E'} {base64.b64encode(piece).decode()}\n")
    sys.stdout.flush()


def _write_all(fd: int, data: bytes, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    view = memoryview(data)
    while view:
        if time.monotonic() > deadline:
            raise Refused("timed out writing the request to the guest console")
        select.select([], [fd], [], 0.5)
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            continue
        view = view[n:]


# -- entry point -------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xenlab_agent.domctl")
    sub = parser.add_subparsers(dest="verb", required=True)
    sub.add_parser("create")  # spec as JSON on stdin
    p = sub.add_parser("destroy")
    p.add_argument("name")
    p.add_argument("--timeout", type=float, default=30)
    sub.add_parser("list")
    p = sub.add_parser("exec")  # {"script", "stdin_b64", "timeout"} on stdin
    p.add_argument("name")
    p = sub.add_parser("console")
    p.add_argument("name")
    p.add_argument("-n", "--lines", type=int, default=40)
    p = sub.add_parser("dump-core")
    p.add_argument("name")
    p = sub.add_parser("leftovers")
    p.add_argument("domid", type=int)
    p.add_argument("name")
    args = parser.parse_args(argv)
    result: dict | list[dict]
    try:
        if args.verb == "create":
            result = create(json.load(sys.stdin))
        elif args.verb == "destroy":
            result = destroy(args.name, args.timeout)
        elif args.verb == "list":
            result = list_guests()
        elif args.verb == "dump-core":
            result = dump_core(args.name)
        elif args.verb == "exec":
            req = json.load(sys.stdin)
            streamed = bool(req.get("stream"))
            result = exec_in(args.name, req["script"], base64.b64decode(req.get("stdin_b64", "")), req.get("timeout", 120),
                             on_chunk=stream_frame if streamed else None)
            if streamed:  # the output went out as it came: only the exit code is left to say
                result = {"rc": result["rc"]}
        elif args.verb == "console":
            if domid_of(args.name) is None and read_meta(args.name) is None and not console_text(args.name):
                raise Refused(f"no guest named {args.name!r}", "see `xenlab guest list`")
            result = {"name": args.name, "log": CONSOLE_LOG.format(name=args.name), "tail": console_tail(args.name, args.lines)}
        else:
            with XenStore() as store:
                result = leftovers(store, args.domid, args.name)
    except AgentError as e:
        return report(e)
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
