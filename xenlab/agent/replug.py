"""Taking a running guest's vbd and vif devices away and giving them back, as
a toolstack does (`xl block-detach`/`network-detach`, then `-attach` with the
same backing file, address and hotplug script), around a reload of the
frontend module that drives them: a frontend whose module is unloaded goes
Closed and never starts over, so its devices must be new ones to the guest.
`python3 -m xenlab_agent.replug unplug NAME --devices vbd/51728,vif/0`,
`plug NAME [--kinds vbd,vif]`, `pending NAME`.

What was unplugged is recorded in the guest's directory until it is plugged
again, so a reload interrupted between the two is finished by the next
`plug` (or `xenlab guest module GUEST load`)."""

from __future__ import annotations

import json
import os
import sys
import time

from .domains import domid_of, guest_dir, wait_nodes, xl
from .errors import AgentError
from .facts import PY_BLOCK_BACKEND
from .sysutil import atomic_write
from .xs import XenStore

UNPLUGGED_DIR = "unplugged"  # in a guest's directory: one JSON record per device taken away
KINDS = ("vbd", "vif")


class ReplugError(AgentError):
    pass


def _dir(name: str) -> str:
    return os.path.join(guest_dir(name), UNPLUGGED_DIR)


def _domid(name: str) -> int:
    domid = domid_of(name)
    if domid is None:
        raise ReplugError(f"no running guest named {name!r}", "see `xenlab guest list`")
    if not os.path.isdir(guest_dir(name)):
        raise ReplugError(f"guest {name!r} was not made by xenlab", "reload modules in guests made with `xenlab guest create`")
    return domid


def _config(xs: XenStore, domid: int, kind: str, devid: int) -> dict:
    """What `xl KIND-attach` needs to make the same device again."""
    front = f"/local/domain/{domid}/device/{kind}/{devid}"
    back = xs.try_read(f"{front}/backend")
    if back is None:
        raise ReplugError(f"the guest has no {kind}/{devid}", "see `xenlab guest module GUEST ls` for its devices")
    backend_kind = back.split("/")[-3]
    if backend_kind == PY_BLOCK_BACKEND:
        vdev = xs.try_read(f"{back}/dev") or str(devid)
        raise ReplugError(f"{kind}/{devid} ({vdev}) is served by the Python block backend, which ends with its device",
                          f"detach it first (`xenlab guest detach GUEST {vdev}`), reload, and attach a disk again")
    if backend_kind != kind:
        raise ReplugError(f"{kind}/{devid} has a {backend_kind} backend; xenlab gives back kernel vbd and vif devices only")

    def node(key: str) -> str:
        return xs.try_read(f"{back}/{key}") or ""

    record = {"kind": kind, "devid": devid, "backend_path": back, "frontend_path": front, "script": node("script")}
    if kind == "vbd":
        record.update(vdev=node("dev"), target=node("params"), access="ro" if node("mode") == "r" else "rw")
        if not record["target"] or not record["vdev"]:
            raise ReplugError(f"vbd/{devid} has no params or dev in its backend ({back})")
    else:
        record.update(mac=node("mac"), bridge=node("bridge"), type=node("type"))
    return record


def _attach_spec(record: dict) -> str:
    script = f",script={record['script']}" if record["script"] else ""
    if record["kind"] == "vbd":
        return f"format=raw,vdev={record['vdev']},access={record['access']}{script},target={record['target']}"
    kind = ",type=vif" if record.get("type") == "vif" else ""
    return f"mac={record['mac']},bridge={record['bridge']}{kind}{script}"


def unplug(name: str, devices: str, timeout: float = 30.0) -> dict:
    """Detach DEVICES ("vbd/51728,vif/0") of guest NAME, recording each to plug it back."""
    domid = _domid(name)
    wanted = [d for d in devices.split(",") if d]
    xs = XenStore()
    try:
        records = []
        for entry in wanted:
            kind, _, devid = entry.partition("/")
            if kind not in KINDS or not devid.isdigit():
                raise ReplugError(f"bad device {entry!r}", "write KIND/DEVID, KIND one of vbd, vif")
            records.append(_config(xs, domid, kind, int(devid)))
        os.makedirs(_dir(name), exist_ok=True)
        done = []
        for record in records:
            # Recorded first: a detach that is interrupted is still given back by `plug`.
            atomic_write(os.path.join(_dir(name), f"{record['kind']}-{record['devid']}.json"), json.dumps(record))
            t0 = time.monotonic()
            verb = "block-detach" if record["kind"] == "vbd" else "network-detach"
            proc = xl(verb, name, str(record["devid"]), check=False, timeout=timeout + 30)
            left = wait_nodes(xs, [record["frontend_path"], record["backend_path"]], True, timeout)
            if proc.returncode != 0 or left:
                raise ReplugError(f"{record['kind']}/{record['devid']} did not detach in {timeout:.0f} s"
                                  + (f": {proc.stderr.strip()[-300:]}" if proc.returncode else f" ({', '.join(left)} still there)"),
                                  "its frontend did not close: the module still holds it (I/O in flight?); the guest keeps its old module")
            done.append({**record, "seconds": round(time.monotonic() - t0, 2)})
        return {"name": name, "domid": domid, "unplugged": done}
    finally:
        xs.close()


def pending(name: str) -> list[dict]:
    folder = _dir(name)
    records = []
    for entry in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if entry.endswith(".json"):
            with open(os.path.join(folder, entry)) as f:
                records.append(json.load(f))
    return records


def plug(name: str, kinds: str = "vbd,vif", timeout: float = 60.0) -> dict:
    """Attach again every recorded device of KINDS; returns once each is Connected."""
    domid = _domid(name)
    wanted = set(kinds.split(","))
    xs = XenStore()
    try:
        done = []
        for record in pending(name):
            if record["kind"] not in wanted:
                continue
            t0 = time.monotonic()
            verb = "block-attach" if record["kind"] == "vbd" else "network-attach"
            xl(verb, name, _attach_spec(record), timeout=timeout)
            os.unlink(os.path.join(_dir(name), f"{record['kind']}-{record['devid']}.json"))
            front = f"/local/domain/{domid}/device/{record['kind']}/{record['devid']}"
            back = f"/local/domain/0/backend/{record['kind']}/{domid}/{record['devid']}"
            left = wait_nodes(xs, [front, back], False, timeout)
            if left:
                raise ReplugError(f"{record['kind']}/{record['devid']} was attached again but is not Connected after {timeout:.0f} s "
                                  f"({', '.join(p + ' ' + (xs.try_read(p + '/state') or 'gone') for p in left)})",
                                  "the new module did not take it: see `xenlab guest console GUEST`")
            done.append({**record, "seconds": round(time.monotonic() - t0, 2)})
        return {"name": name, "domid": domid, "plugged": done}
    finally:
        xs.close()


COMMANDS = {"unplug": unplug, "plug": plug, "pending": pending}


def main(argv: list[str] | None = None) -> int:
    from .cmdline import run_main

    return run_main(COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
