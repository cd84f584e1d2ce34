"""A driver author's loop in a running guest: list its kernel modules, load,
unload and reload one (`xenlab guest module GUEST ls|load|unload|reload`).

A frontend whose module is unloaded goes Closed and never starts over
(xenbus_dev_remove), so the devices it drives are taken away first, as a
toolstack does (a clean closedown: backend Closing, frontend Closed), and
given back once the new module is in (a fresh bring-up, driven by it): the
XenBus tracer records both and checks them against the protocol. A module
that does not load leaves the old one in, its devices given back to it."""

from __future__ import annotations

import gzip
import re
import secrets
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field

from xenlab.agent.facts import KERNEL_OOPS
from xenlab.agent.replug import KINDS as REPLUGGED_KINDS
from xenlab.build.rootfs import MODULES_IN_USE, STOCK_MODULE_DIR
from xenlab.drivers.modules import ModuleFile, check_params, read_module
from xenlab.errors import ConfigError, GuestError
from xenlab.guest.manager import Guests
from xenlab.xenstore.client import XenStore
from xenlab.xenstore.recorder import traced
from xenlab.xenstore.tracer import check, format_reports, violation_summary

LOADED_DIR = MODULES_IN_USE + ".d"  # in the guest: the module files loaded by `load`/`reload`
CHANGE_LOCK = MODULES_IN_USE + ".lock"  # in the guest: a directory while a load/unload/reload runs (its start time inside)
STALE_LOCK_S = 600  # a lock older than this was left by a command that died
# A guest's disks in use (mounted or swapped on), one /dev/xvdX a line.
MOUNTED_DISKS = "grep -o '^/dev/xvd[a-z]*' /proc/mounts /proc/swaps 2>/dev/null | sed 's/.*://'"


@dataclass
class GuestModules:
    """What a guest has loaded: release, each module's file and origin, and
    the XenBus devices and the driver module each is bound to."""

    release: str
    in_use: dict[str, dict]  # name -> {file, origin}; origin stock|yours|reloaded|kept-off
    loaded: dict[str, dict]  # /proc/modules: name -> {size, used_by}
    devices: list[dict] = field(default_factory=list)  # {kind, devid, module (or ""), driver}
    mounted: list[str] = field(default_factory=list)  # /dev/xvd* in use (mounts, swaps)
    stock: list[str] = field(default_factory=list)  # the stock modules its root carries

    def bound_to(self, module: str) -> list[dict]:
        return [d for d in self.devices if d["module"] == module]


_STATE_SCRIPT = (
    "uname -r; echo @@; cat " + MODULES_IN_USE + " 2>/dev/null; echo @@; cat /proc/modules; echo @@; "
    "for dev in /sys/bus/xen/devices/*; do [ -e \"$dev\" ] || continue; d=${dev##*/}; "
    "m=''; drv=''; if [ -e \"$dev/driver\" ]; then drv=$(readlink \"$dev/driver\"); drv=${drv##*/}; "
    "m=$(readlink \"$dev/driver/module\" 2>/dev/null); m=${m##*/}; fi; echo \"$d ${drv:--} ${m:--}\"; done; echo @@; "
    f"{MOUNTED_DISKS}; echo @@; "
    f"ls {STOCK_MODULE_DIR} 2>/dev/null"
)


def _locking(script: str) -> str:
    """`script` run only once this command holds the guest's module lock (else LOCKED AGE)."""
    return (f"now=$(date +%s); if ! mkdir {CHANGE_LOCK} 2>/dev/null; then since=$(cat {CHANGE_LOCK}/since 2>/dev/null || echo 0); "
            f"if [ $((now - since)) -lt {STALE_LOCK_S} ]; then echo LOCKED $((now - since)); exit 0; fi; fi; "
            f"echo $now > {CHANGE_LOCK}/since; " + script)


def _unlock(guests: Guests, name: str) -> None:
    guests.exec(name, f"rm -rf {CHANGE_LOCK}", timeout=30)


def state(guests: Guests, name: str, lock: bool = False) -> GuestModules:
    result = guests.exec(name, _locking(_STATE_SCRIPT) if lock else _STATE_SCRIPT, timeout=60)
    if result.stdout.startswith("LOCKED"):
        age = result.stdout.split()[1] if len(result.stdout.split()) > 1 else "?"
        raise GuestError(f"another module load, unload or reload runs in guest {name!r} (for {age} s)",
                         f"wait for it to finish; a lock left by a command that died expires after {STALE_LOCK_S} s")
    if result.exit_status != 0 and "@@" not in result.stdout:
        raise GuestError(f"could not read guest {name!r}'s modules: {result.stderr.strip()[-300:]}")
    release, in_use, proc, devices, mounted, stock = (part.strip() for part in (result.stdout.split("@@") + [""] * 6)[:6])
    found = GuestModules(release.splitlines()[-1] if release else "", {}, {})
    for line in in_use.splitlines():
        mod, file, origin = (line.split() + ["", ""])[:3]
        found.in_use[mod] = {"file": file, "origin": origin}
    for line in proc.splitlines():
        parts = line.split()
        if len(parts) >= 4:
            found.loaded[parts[0]] = {"size": int(parts[1]), "used_by": [u for u in parts[3].split(",") if u and u != "-"]}
    for line in devices.splitlines():
        dev, driver, module = (line.split() + ["-", "-"])[:3]
        kind, _, devid = dev.rpartition("-")
        if devid.isdigit():
            found.devices.append({"kind": kind, "devid": int(devid), "driver": "" if driver == "-" else driver,
                                  "module": "" if module == "-" else module})
    found.mounted = sorted(set(mounted.split()))
    found.stock = [f.removesuffix(".ko") for f in stock.split() if f.endswith(".ko")]
    return found


def listing(guests: Guests, name: str) -> dict:
    """`guest module GUEST ls`: modules (origin, file, size, devices) and devices waiting to be given back."""
    now = state(guests, name)
    pending = guests.agent("replug", "pending", name)
    rows = []
    for mod in sorted(set(now.loaded) | set(now.in_use)):
        use = now.in_use.get(mod, {})
        rows.append({"name": mod, "loaded": mod in now.loaded, "origin": use.get("origin", "by hand"), "file": use.get("file", ""),
                     "size": now.loaded.get(mod, {}).get("size"),
                     "devices": [f"{d['kind']}/{d['devid']}" for d in now.bound_to(mod)]})
    return {"guest": name, "release": now.release, "modules": rows,
            "unbound": [f"{d['kind']}/{d['devid']}" for d in now.devices if not d["driver"]],
            "unplugged": [f"{r['kind']}/{r['devid']}" for r in pending]}


def _check_fits(mod: ModuleFile, now: GuestModules, name: str) -> None:
    if mod.release != now.release:
        raise ConfigError(f"module {mod.path} was built for kernel {mod.release}, but guest {name!r} runs {now.release}",
                          "rebuild it against the guest's kernel: make -C \"$(xenlab guest kernel-dir)\" M=$PWD modules"
                          " (a --kernel debian guest: dom0's headers)")


def _devices_to_unplug(now: GuestModules, module: str, name: str) -> list[dict]:
    bound = now.bound_to(module)
    other = [d for d in bound if d["kind"] not in REPLUGGED_KINDS]
    if other:
        raise GuestError(f"{module} drives {', '.join(d['kind'] + '/' + str(d['devid']) for d in other)} in guest {name!r}, "
                         "which xenlab cannot take away and give back (only vbd and vif)",
                         f"unload it by hand (`xenlab guest exec {name} -- rmmod {module}`) if its devices can go")
    return bound


def _check_unmounted(now: GuestModules, devices: list[dict], name: str) -> None:
    if now.mounted and any(d["kind"] == "vbd" for d in devices):
        raise disks_in_use(name, now.mounted)


def disks_in_use(name: str, mounted: list[str], unchanged: str = "") -> GuestError:
    """The refusal for a guest whose disks would be taken away while mounted (xl would force them)."""
    return GuestError(f"guest {name!r} has {', '.join(mounted)} mounted (or as swap): its disks cannot be taken away",
                      f"unmount them first (`xenlab guest exec {name} -- umount /dev/xvdX`){unchanged}")


def _swap_script(module: str, new: str, params: str, mode: str) -> str:
    """rmmod the loaded module, insmod `new` (mode "ship": written from stdin, gzipped
    first; "stock": the root's own file), the old file back if it does not
    load; mode "unload": rmmod only."""
    q = shlex.quote
    record = (f"grep -v '^{module} ' {MODULES_IN_USE} > {MODULES_IN_USE}.new 2>/dev/null; "
              f"echo \"{module} $1 $2\" >> {MODULES_IN_USE}.new; mv {MODULES_IN_USE}.new {MODULES_IN_USE}")
    lines = [
        f"note() {{ {record}; }}",
        "before=$(dmesg | wc -l); echo before=$before",
        f"old=$(awk '$1==\"{module}\" && $2!=\"-\" {{print $2}}' {MODULES_IN_USE} 2>/dev/null | tail -n 1)",
        f"if grep -q '^{module} ' /proc/modules; then",
        f"  if ! rmmod {module} 2>/tmp/rmmod.err; then echo result=rmmod-failed; cat /tmp/rmmod.err; exit 0; fi",
        "fi",
    ]
    if mode == "unload":
        lines += ["note - unloaded", "echo result=unloaded"]
    else:
        origin, drop_new = ("reloaded", f"rm -f {q(new)}") if mode == "ship" else ("stock", ":")
        lines += [
            f"mkdir -p {LOADED_DIR}; zcat > {q(new)}" if mode == "ship" else ":",
            f"if insmod {q(new)} {params} 2>/tmp/insmod.err; then note {q(new)} {origin}; echo result=loaded",
            f"  case \"$old\" in {LOADED_DIR}/*) rm -f \"$old\" ;; esac  # an earlier reload's file",
            "else echo result=insmod-failed; cat /tmp/insmod.err",
            # A module whose init oopsed stays half-loaded: loading the old one would wait for it forever.
            f"  if dmesg | tail -n +$((before + 1)) | grep -qE {q(KERNEL_OOPS)}; then echo result=oopsed; note - oopsed",
            "  elif [ -n \"$old\" ] && insmod \"$old\" 2>/tmp/insmod-old.err; then echo result=old-back",
            f"  else note - none; {drop_new}; fi",
            "fi",
        ]
    lines += ["echo @@", "dmesg | tail -n +$((before + 1))"]
    return "\n".join(lines)


def _run_swap(guests: Guests, name: str, mod: ModuleFile | None, module: str, params: str, action: str) -> dict:
    if action == "restore":
        new, mode = f"{STOCK_MODULE_DIR}/{module}.ko", "stock"
    else:
        new, mode = f"{LOADED_DIR}/{module}-{secrets.token_hex(3)}.ko", "ship" if mod else "unload"
    script = _swap_script(module, new, params, mode)
    # Gzipped: the console carries about 25 KB/s of base64 into a TCG guest, and a module packs to 40%.
    shipped = gzip.compress(mod.data, compresslevel=6) if mod and mode == "ship" else b""
    result = guests.exec(name, script, input=shipped, timeout=120)
    head, _, log = result.stdout.partition("@@")
    outcome = [line[7:] for line in head.splitlines() if line.startswith("result=")]
    words = "\n".join(line for line in head.splitlines() if not line.startswith(("result=", "before="))).strip()
    before = next((int(line[7:]) for line in head.splitlines() if line.startswith("before=") and line[7:].isdigit()), 0)
    return {"outcome": outcome, "error": words, "kernel_log": [line for line in log.splitlines() if line.strip()], "file": new,
            "before": before}


NET_UP = ("for arg in $(cat /proc/cmdline); do case $arg in xenlab.ip=*) ip=${arg#xenlab.ip=} ;; esac; done; "
           "if [ -n \"$ip\" ] && [ -e /sys/class/net/eth0 ]; then ip link set eth0 up; ip addr add \"$ip\" dev eth0 2>/dev/null; fi; true")


def change(guests: Guests, name: str, action: str, path: str = "", module: str = "", params: str = "",
           echo: Callable[[str], None] | None = None, timeout: float = 60) -> dict:
    """load, unload or reload a module in guest NAME, its devices taken away and
    given back around it, traced. Returns the outcome, the module's kernel
    log lines, each device's handshake verdicts; raises GuestError when the
    new module did not load (saying which module the guest has now)."""
    if action not in ("load", "unload", "reload", "restore"):
        raise ConfigError(f"unknown module action {action!r}", "ls, load, unload, reload or restore")
    check_params(params, "feature_persistent=0")
    mod = read_module(path) if action in ("load", "reload") else None
    module = mod.name if mod else module.removesuffix(".ko").replace("-", "_")
    now = state(guests, name, lock=True)
    result: dict = {}
    try:
        return _change(guests, name, action, mod, module, now, path, params, echo, timeout, result)
    finally:
        if not result.get("unlocked"):
            _unlock(guests, name)


def _change(guests: Guests, name: str, action: str, mod: ModuleFile | None, module: str, now: GuestModules, path: str,
            params: str, echo: Callable[[str], None] | None, timeout: float, result: dict) -> dict:
    if mod:
        _check_fits(mod, now, name)
    if action == "load" and module in now.loaded:
        raise GuestError(f"guest {name!r} has {module} loaded already", f"replace it with `xenlab guest module {name} reload {path}`")
    if action == "unload" and module not in now.loaded:
        raise GuestError(f"guest {name!r} has no {module} loaded", f"loaded: {', '.join(sorted(now.loaded)) or 'none'}")
    if action == "restore" and module not in now.stock:
        raise GuestError(f"guest {name!r}'s kernel has no stock module {module}", f"its stock modules: {', '.join(now.stock) or 'none'}")
    devices = _devices_to_unplug(now, module, name) if module in now.loaded else []
    _check_unmounted(now, devices, name)
    kinds = sorted({d["kind"] for d in devices} | set(mod.kinds if mod else ()))
    result.update(guest=name, module=module, action=action, file=str(mod.path) if mod else "")
    with XenStore.for_lab(guests.lab, timeout=10) as store, traced(store, name, echo=echo) as recorder:
        if devices:
            result["unplugged"] = guests.agent("replug", "unplug", name, "--devices",
                                               ",".join(f"{d['kind']}/{d['devid']}" for d in devices), "--timeout", str(timeout),
                                               timeout=timeout + 60)["unplugged"]
        swap = _run_swap(guests, name, mod, module, params, action)
        result.update(outcome=swap["outcome"], kernel_log=swap["kernel_log"])
        if kinds and ({"loaded", "old-back"} & set(swap["outcome"])):
            # Given back to whichever module is in now: the new one, or the old one put back.
            try:
                plugged = guests.agent("replug", "plug", name, "--kinds", ",".join(kinds), "--timeout", str(timeout),
                                       timeout=timeout + 60)["plugged"]
            except GuestError as e:
                _raise_if_oopsed(guests, name, swap["before"], path or module, module, e.message)
                raise
            result["plugged"] = plugged
        # One last round trip: eth0's address back, the kernel's lines since
        # the swap (the new module's, as its devices connected), the lock freed.
        net_up = NET_UP + "; " if any(p["kind"] == "vif" for p in result.get("plugged", [])) else ""
        last = guests.exec(name, f"{net_up}dmesg | tail -n +{swap['before'] + 1}; rm -rf {CHANGE_LOCK}", timeout=30)
        result["unlocked"] = last.ok
        if last.ok:
            result["kernel_log"] = [line for line in last.stdout.splitlines() if line.strip()]
        timeline = list(recorder.timeline)
    result.pop("unlocked", None)
    reports = check(timeline)
    result["devices"] = [r.to_dict() for r in reports]
    result["verdicts"] = format_reports(reports)
    result["violation"] = violation_summary(reports)
    if "oopsed" in swap["outcome"]:
        _raise_if_oopsed(guests, name, swap["before"], path, module, swap["error"])
    _raise_on_failure(swap, name, module, path)
    return result


def _raise_if_oopsed(guests: Guests, name: str, before: int, what: str, module: str, error: str) -> None:
    """An oops in the guest's kernel since the swap began (the module's init or
    its probe): its core taken (the guest runs on), and said."""
    log = guests.exec(name, f"dmesg | tail -n +{before + 1}", timeout=30).stdout.splitlines()
    oops = next((line for line in log if re.search(KERNEL_OOPS, line)), None)
    if oops is None:
        return
    folder = guests.dump_core(name)["core_dir"]
    raise GuestError(f"{what} oopsed in guest {name!r} ({oops.strip()}); {error.strip() or 'its devices did not come back'}. "
                     f"The guest runs on without a working {module}: a module that oopsed stays half-loaded, "
                     f"so no {module} loads again until the guest restarts",
                     f"its core is in {folder} (`xenlab debug core-log {folder}`); "
                     f"`xenlab guest destroy {name}` and create it again to start over")


def _raise_on_failure(swap: dict, name: str, module: str, path: str) -> None:
    outcome = swap["outcome"]
    log = "\n".join(swap["kernel_log"][-12:])
    if "rmmod-failed" in outcome:
        raise GuestError(f"guest {name!r} would not unload {module}: {swap['error']}",
                         "the guest keeps it; something still uses it (`xenlab guest module " + name + " ls`)")
    if "insmod-failed" in outcome:
        now = "the old one is back in, its devices given back to it" if "old-back" in outcome else \
            f"the guest has no {module} now (its devices wait: `xenlab guest module {name} load FILE` gives them back)"
        raise GuestError(f"{path} did not load in guest {name!r}: {swap['error'] or 'insmod failed'}; {now}",
                         ("its kernel log:\n" + log) if log else "see `xenlab guest console " + name + "`")


def module_command(guests: Guests, name: str, action: str, target: str = "", params: str = "",
                   echo: Callable[[str], None] | None = None, timeout: float = 60) -> dict:
    """`xenlab guest module GUEST ACTION [TARGET] [PARAMS]`: ls, load FILE, unload NAME, reload FILE,
    restore NAME (the guest's own stock module put back)."""
    if action == "ls":
        return listing(guests, name)
    by_name = action in ("unload", "restore")
    if action in ("load", "reload", "unload", "restore") and not target:
        raise ConfigError(f"`module {action}` needs " + ("the module's name" if by_name else "the .ko file"),
                          f"e.g. xenlab guest module {name} {action} " + ("xen-blkfront" if by_name else "./xen-blkfront.ko"))
    if by_name:
        return change(guests, name, action, module=target, echo=echo, timeout=timeout)
    return change(guests, name, action, path=target, params=params, echo=echo, timeout=timeout)
