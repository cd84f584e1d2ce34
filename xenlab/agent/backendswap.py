"""Replacing a backend module in dom0 (xen-blkback, xen-netback) under the
guests it serves: every device of its kinds is taken away from its guest
(a clean closedown, as `xl block-detach` does), the module is swapped, and
the devices are given back, now served by the new one.
`python3 -m xenlab_agent.backendswap swap MODULE --kinds vbd [--file F.ko]
[--mode ship|stock|unload] [--params 'k=v'] [--timeout S]`, `state`.

A module that does not load leaves the old one back in (the stock one
through modprobe, or the file loaded before); the devices are given back
to whichever is in. What dom0 loaded by hand is recorded in
BACKENDS_IN_USE ("name file origin"), for `state` and for the way back."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys

from . import replug
from .domains import guest_dir
from .errors import AgentError
from .facts import GUESTS_DIR, LOCK_DIR
from .xs import XenStore

BACKENDS_IN_USE = f"{LOCK_DIR}/backend-modules"  # name file origin, per module loaded by xenlab
LOADED_DIR = BACKENDS_IN_USE + ".d"  # the shipped .ko files in use
SWAP_LOCK = BACKENDS_IN_USE + ".lock"
MODES = ("ship", "stock", "unload", "load")


class SwapError(AgentError):
    pass


def _sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True)


def _records() -> dict[str, tuple[str, str]]:
    found = {}
    try:
        with open(BACKENDS_IN_USE) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3:
                    found[parts[0]] = (parts[1], parts[2])
    except FileNotFoundError:
        pass
    return found


def _note(module: str, file: str, origin: str) -> None:
    records = _records()
    records[module] = (file, origin)
    os.makedirs(LOCK_DIR, exist_ok=True)
    with open(BACKENDS_IN_USE + ".new", "w") as f:
        f.writelines(f"{m} {fi} {o}\n" for m, (fi, o) in sorted(records.items()))
    os.replace(BACKENDS_IN_USE + ".new", BACKENDS_IN_USE)


def _loaded() -> dict[str, int]:
    with open("/proc/modules") as f:
        return {line.split()[0]: int(line.split()[1]) for line in f if line.strip()}


def _builtin(module: str) -> bool:
    try:
        with open(f"/lib/modules/{os.uname().release}/modules.builtin") as f:
            return any(os.path.basename(line.strip()).removesuffix(".ko").replace("-", "_") == module for line in f)
    except FileNotFoundError:
        return False


def served(kinds: list[str]) -> list[dict]:
    """Every device dom0's kernel backends of KINDS serve: {kind, domid, devid, guest, xenlab}."""
    xs = XenStore()
    try:
        found = []
        for kind in kinds:
            for domid in sorted(xs.try_directory(f"/local/domain/0/backend/{kind}") or [], key=int):
                name = xs.try_read(f"/local/domain/{domid}/name") or ""
                for devid in sorted(xs.try_directory(f"/local/domain/0/backend/{kind}/{domid}") or [], key=int):
                    found.append({"kind": kind, "domid": int(domid), "devid": int(devid), "guest": name,
                                  "xenlab": bool(name) and os.path.isdir(guest_dir(name))})
        return found
    finally:
        xs.close()


def state() -> dict:
    """dom0's release, its loaded modules, what xenlab loaded, and the backend devices of vbd and vif."""
    return {"release": os.uname().release, "loaded": _loaded(),
            "records": {m: {"file": f, "origin": o} for m, (f, o) in _records().items()},
            "devices": served(list(replug.KINDS)), "pending": {name: replug.pending(name) for name in _pending_guests()}}


def _pending_guests() -> list[str]:
    """The guests with devices taken away and not yet given back (replug's records)."""
    names = sorted(os.listdir(GUESTS_DIR)) if os.path.isdir(GUESTS_DIR) else []
    return [n for n in names if replug.pending(n)]


def _dmesg() -> list[str]:
    return _sh("dmesg").stdout.splitlines()


def _insmod(module: str, file: str, params: str) -> tuple[bool, str]:
    """Load `file`, or the stock module through modprobe when file is "-"."""
    words = params.split()
    proc = _sh("modprobe", module.replace("_", "-"), *words) if file == "-" else _sh("insmod", file, *words)
    return proc.returncode == 0, (proc.stderr or proc.stdout).strip()


def swap(module: str, kinds: str = "", file: str = "", mode: str = "ship", params: str = "", timeout: float = 60.0) -> dict:
    """Take every device of KINDS away, swap MODULE (mode ship: insmod FILE;
    stock: modprobe; unload: rmmod only; load: insmod FILE, nothing to take
    away), give the devices back. Returns what was done, dom0's kernel lines
    since, and the outcome: loaded, insmod-failed (+ old-back), unloaded."""
    if mode not in MODES:
        raise SwapError(f"unknown mode {mode!r}", "ship, stock, unload or load")
    if _builtin(module):
        raise SwapError(f"{module} is built into dom0's kernel ({os.uname().release}): it cannot be unloaded or replaced",
                        "boot a dom0 kernel that builds it as a module (=m), e.g. Debian's (`xenlab up` without --dom0-kernel)")
    os.makedirs(LOCK_DIR, exist_ok=True)
    with open(SWAP_LOCK, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SwapError("another backend module load, unload or reload runs in dom0",
                            "wait for it to finish (one at a time: they take devices from every guest)") from None
        return _swap_locked(module, [k for k in kinds.split(",") if k], file, mode, params, timeout)


def _swap_locked(module: str, kinds: list[str], file: str, mode: str, params: str, timeout: float) -> dict:
    loaded = module in _loaded()
    if mode in ("ship", "load") and not os.path.isfile(file):
        raise SwapError(f"no module file {file} in dom0")
    if mode == "load" and loaded:
        raise SwapError(f"dom0 has {module} loaded already", "replace it with `xenlab dom0 module reload FILE.ko`")
    if mode == "unload" and not loaded:
        raise SwapError(f"dom0 has no {module} loaded", "see `xenlab dom0 module ls`")
    devices = served(kinds) if loaded else []
    foreign = [d for d in devices if not d["xenlab"]]
    if foreign:
        raise SwapError(f"{module} serves devices of domains xenlab did not make: "
                        + ", ".join(f"{d['kind']}/{d['devid']} of {d['guest'] or 'domain ' + str(d['domid'])}" for d in foreign),
                        "destroy those domains (or detach their devices) first: xenlab gives back only its own guests' devices")
    by_guest: dict[str, list[str]] = {}
    for d in devices:
        by_guest.setdefault(d["guest"], []).append(f"{d['kind']}/{d['devid']}")
    before = len(_dmesg())
    result: dict = {"module": module, "mode": mode, "unplugged": [], "plugged": [], "outcome": []}
    # Given back afterwards: what this swap took, and, when the module was
    # out (an earlier unload), every device of its kinds that waits.
    give_back = list(by_guest) if loaded else _pending_guests()
    try:
        for name, wanted in by_guest.items():
            result["unplugged"] += [{**r, "guest": name} for r in replug.unplug(name, ",".join(wanted), timeout)["unplugged"]]
    except AgentError as e:
        _give_back(give_back, kinds, timeout, result)  # the old module keeps them
        left = "; not given back: " + "; ".join(f"{x['guest']}: {x['error']}" for x in result["left"]) if result.get("left") else ""
        raise SwapError(f"{module} kept: {e.message}{left}",
                        "the guest's frontend did not let its device go (I/O in flight?); dom0 keeps its module") from None
    old_file, _ = _records().get(module, ("-", "stock"))
    if loaded:
        proc = _sh("rmmod", module)
        if proc.returncode != 0:
            _give_back(give_back, kinds, timeout, result)
            raise SwapError(f"dom0 would not unload {module}: {proc.stderr.strip()}", "something in dom0 still uses it (lsmod)")
    if mode == "unload":
        _note(module, "-", "unloaded")
        result["outcome"].append("unloaded")
    else:
        new_file = "-" if mode == "stock" else file
        ok, error = _insmod(module, new_file, params)
        if ok:
            _note(module, new_file, "stock" if mode == "stock" else "reloaded")
            result["outcome"].append("loaded")
            if old_file.startswith(LOADED_DIR + "/") and old_file != new_file and os.path.exists(old_file):
                os.unlink(old_file)  # an earlier reload's file
        else:
            result["outcome"].append("insmod-failed")
            result["error"] = error
            if loaded and _insmod(module, old_file, "")[0]:
                result["outcome"].append("old-back")
            else:
                _note(module, "-", "none")
            if mode == "ship" and os.path.exists(file):
                os.unlink(file)
    if module in _loaded():
        _give_back(give_back, kinds, timeout, result)
    result["kernel_log"] = _dmesg()[before:]
    return result


def _give_back(names: list[str], kinds: list[str], timeout: float, result: dict) -> None:
    """Every guest's devices back; one that does not come back is recorded in
    result["left"] (the others still go), never raised over what happened before."""
    for name in names:
        try:
            result["plugged"] += [{**r, "guest": name} for r in replug.plug(name, ",".join(kinds), timeout)["plugged"]]
        except AgentError as e:
            result.setdefault("left", []).append({"guest": name, "error": e.message})


COMMANDS = {"swap": swap, "state": state}


def main(argv: list[str] | None = None) -> int:
    from .cmdline import run_main

    return run_main(COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
