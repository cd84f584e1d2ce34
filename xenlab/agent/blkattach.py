"""Attaching and detaching extra disks to a running domU, as a toolstack
does: through xenlab's Python block backend (blkback.py, started here as a
process of its own) or through the kernel's blkback. The records of what is
attached live in the guest's directory. Run as `python3 -m
xenlab_agent.blkback attach|detach|list` (blkback.py's entry point)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from . import facts, faultplan
from .blkif import xvd_devid
from .domains import domid_of, guest_dir, wait_nodes, xl
from .errors import AgentError
from .facts import CONNECTED, INITWAIT, PY_BLOCK_BACKEND
from .sysutil import atomic_write, pid_alive
from .xs import XenStore, XsError


class BlkbackError(AgentError):
    pass


def paths(domid: int, devid: int) -> tuple[str, str]:
    """The backend and frontend directories of a disk served by the Python backend."""
    return (f"/local/domain/0/backend/{PY_BLOCK_BACKEND}/{domid}/{devid}", f"/local/domain/{domid}/device/vbd/{devid}")


def node_state(xs: XenStore, path: str) -> int | None:
    """The XenBus state in `path`/state, None when there is none."""
    value = xs.try_read(f"{path}/state")
    return int(value) if value is not None and value.isdigit() else None


def _attach_dir(name: str) -> str:
    return os.path.join(guest_dir(name), facts.ATTACHED_DIR)


def _record(name: str, vdev: str) -> str:
    return os.path.join(_attach_dir(name), f"{vdev}.json")


def _vbds(xs: XenStore, domid: int) -> list[int]:
    return [int(d) for d in xs.try_directory(f"/local/domain/{domid}/device/vbd") if d.isdigit()]


def _pick_vdev(xs: XenStore, domid: int, name: str, wanted: str) -> str:
    """The first xvd name the guest never had: a blkfront may still hold an
    earlier device of that name (a process stuck in I/O on it), and a new
    device under the same XenStore path would not be probed afresh."""
    used = set(_vbds(xs, domid))
    if wanted:
        devid = xvd_devid(wanted)  # raises on a bad name
        if devid in used:
            raise BlkbackError(f"the guest already has {wanted}", "pick another --vdev, or detach it first")
        return wanted
    had = {entry.split(".", 1)[0] for entry in os.listdir(_attach_dir(name))}
    for letter in "bcdefghijklmnop":
        if xvd_devid(f"xvd{letter}") not in used and f"xvd{letter}" not in had:
            return f"xvd{letter}"
    raise BlkbackError("the guest has no xvd name left that it never used (xvdb..xvdp)", "name one with --vdev, or use a new guest")


def _wait_connected(xs: XenStore, back: str, front: str, timeout: float, alive=lambda: True, backend_only: bool = False) -> None:
    """Until both ends are Connected; backend_only: until the backend waits
    in InitWait for a frontend of the guest's own making."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fe, be = node_state(xs, front), node_state(xs, back)
        if (fe == CONNECTED and be == CONNECTED) or (backend_only and be == INITWAIT):
            return
        if not alive():
            break
        time.sleep(0.1)
    raise BlkbackError(
        f"the disk did not connect in {timeout:.0f} s (frontend {facts.state_name(node_state(xs, front))}, backend {facts.state_name(node_state(xs, back))})",
        "see the guest's console (`xenlab guest console`) and the backend's log")


def attach(name: str, size_mib: int, backend: str, readonly: bool, faults: str, vdev: str, timeout: float,
           profile: bool = False, own_frontend: bool = False) -> dict:
    domid = domid_of(name)
    if domid is None:
        raise BlkbackError(f"no running guest named {name!r}", "see `xenlab guest list`")
    if not os.path.isdir(guest_dir(name)):
        raise BlkbackError(f"guest {name!r} was not made by xenlab", "attach disks to guests made with `xenlab guest create`")
    if faults and backend != "python":
        raise BlkbackError("--faults needs --backend python", "kernel blkback carries out no fault plan")
    plan = faultplan.format_plan(faultplan.parse_plan(faults)) if faults else ""
    os.makedirs(_attach_dir(name), exist_ok=True)
    xs = XenStore()
    try:
        vdev = _pick_vdev(xs, domid, name, vdev)
        devid = xvd_devid(vdev)
        image = os.path.join(_attach_dir(name), f"{vdev}.img")
        with open(image, "wb") as f:
            f.truncate(size_mib << 20)
        record = {"name": name, "domid": domid, "vdev": vdev, "devid": devid, "backend": backend, "path": image,
                  "size_mib": size_mib, "readonly": readonly, "faults": plan, "own_frontend": own_frontend}
        t0 = time.monotonic()
        try:
            if backend == "python":
                record.update(_start_python(xs, record, timeout, profile, own_frontend))
            else:
                spec = f"format=raw,vdev={vdev},access={'ro' if readonly else 'rw'},target={image}"
                xl("block-attach", name, spec, timeout=timeout)
                back, front = f"/local/domain/0/backend/vbd/{domid}/{devid}", f"/local/domain/{domid}/device/vbd/{devid}"
                record.update(backend_path=back, frontend_path=front)
                _wait_connected(xs, back, front, timeout, backend_only=own_frontend)
        except BaseException:
            _undo(xs, record)
            raise
        record["seconds"] = round(time.monotonic() - t0, 2)
        atomic_write(_record(name, vdev), json.dumps(record))  # `list` reads it meanwhile
        return record
    finally:
        xs.close()


def _start_python(xs: XenStore, record: dict, timeout: float, profile: bool, own_frontend: bool) -> dict:
    base = os.path.join(_attach_dir(record["name"]), record["vdev"])
    spec = {k: record[k] for k in ("domid", "devid", "vdev", "path", "readonly", "faults")}
    spec.update(timeout=timeout, result=f"{base}.result.json", profile=profile)
    if os.path.exists(spec["result"]):
        os.unlink(spec["result"])  # an earlier attach's report
    with open(f"{base}.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", f"{facts.AGENT_PACKAGE}.blkback", "serve", json.dumps(spec)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, env=os.environ.copy())
    back, front = paths(record["domid"], record["devid"])
    record.update(pid=proc.pid, backend_path=back, frontend_path=front, log=f"{base}.log", result=f"{base}.result.json")
    try:
        _wait_connected(xs, back, front, timeout, alive=lambda: proc.poll() is None, backend_only=own_frontend)
    except BlkbackError as e:
        if proc.poll() is not None:
            raise BlkbackError(f"the Python backend ended before the disk connected: {_result_error(record)}", e.hint) from None
        raise
    return {"pid": proc.pid}


def _result_error(record: dict) -> str:
    try:
        with open(record["result"]) as f:
            return json.load(f).get("error", "no error recorded")
    except (OSError, ValueError):
        try:
            with open(record["log"]) as f:
                return f.read()[-800:]
        except OSError:
            return "(no log)"


def _stop_python(record: dict, timeout: float) -> dict:
    pid = record["pid"]
    if pid_alive(pid) and _is_our_backend(pid, record):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout + 15
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it ended meanwhile
    try:
        with open(record["result"]) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"ended": "killed", "error": "the backend wrote no report"}


def _is_our_backend(pid: int, record: dict) -> bool:
    """The pid is still this disk's backend (not a process that reused the number)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return record["result"].encode() in f.read()
    except OSError:
        return False


def _undo(xs: XenStore, record: dict) -> None:
    """Whatever an attach or detach left: the backend process, both directories, the image."""
    if record.get("pid"):
        _stop_python(record, 5)
    for path in (record.get("frontend_path"), record.get("backend_path")):
        if path and record["backend"] == "python":
            try:
                xs.rm(path)
            except XsError:
                pass
    try:
        os.unlink(record["path"])
    except OSError:
        pass


def detach(name: str, vdev: str, timeout: float) -> dict:
    try:
        with open(_record(name, vdev)) as f:
            record = json.load(f)
    except FileNotFoundError:
        attached = [r["vdev"] for r in list_attached(name)]
        raise BlkbackError(f"guest {name!r} has no attached disk {vdev!r}",
                           f"attached: {', '.join(attached) or 'none'} (disks given at create go with the guest)") from None
    t0 = time.monotonic()
    xs = XenStore()
    try:
        if record["backend"] == "python":
            report_ = _stop_python(record, timeout)
        else:
            proc = xl("block-detach", name, vdev, check=False, timeout=timeout + 30)
            report_ = {"ended": "detached" if proc.returncode == 0 else f"xl block-detach failed: {proc.stderr.strip()[-400:]}"}
        left = wait_nodes(xs, [record["frontend_path"], record["backend_path"]], True, timeout)
        try:
            os.unlink(record["path"])
        except OSError:
            pass
        result = {"name": name, "vdev": vdev, "backend": record["backend"], "seconds": round(time.monotonic() - t0, 2),
                  "report": report_, "xenstore_left": left}
        # Kept until the guest goes: the name stays taken.
        atomic_write(os.path.join(_attach_dir(name), f"{vdev}.detached.json"), json.dumps({**record, "detached": result}))
        os.unlink(_record(name, vdev))
        return result
    finally:
        xs.close()


def list_attached(name: str) -> list[dict]:
    out = []
    folder = _attach_dir(name)
    for entry in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if entry.endswith(".json") and entry.count(".") == 1:  # not .result.json, .detached.json
            with open(os.path.join(folder, entry)) as f:
                record = json.load(f)
            if record["backend"] == "python":
                record["running"] = pid_alive(record["pid"])
            out.append(record)
    return out
