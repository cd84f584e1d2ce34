"""A backend author's loop in dom0: the build directory of dom0's kernel
(`xenlab dom0 kernel-dir`), and loading, unloading and reloading a backend
module under the guests it serves (`xenlab dom0 module ls|load|unload|
reload|restore`).

A backend module cannot be unloaded while it serves a device, so every
guest device of its kinds is taken away first (a clean XenBus closedown,
as `xl block-detach` does), the module is swapped in dom0, and the devices
are given back, now served by the new module. The XenBus tracer records
every domain's handshakes meanwhile and checks them against the protocol.
The swap itself runs in dom0 in one agent call (xenlab_agent.backendswap),
so a dropped SSH connection cannot leave it half done."""

from __future__ import annotations

import gzip
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from xenlab.agent.backendswap import LOADED_DIR
from xenlab.agent.facts import STOCK_BACKEND_KINDS
from xenlab.build import dom0 as dom0_image
from xenlab.build import headers
from xenlab.build import kernel as kernel_mod
from xenlab.build.boot import modules_dir
from xenlab.build.extras import read_kernel
from xenlab.drivers.guest import MOUNTED_DISKS, NET_UP, disks_in_use
from xenlab.drivers.modules import ModuleFile, check_params, read_module
from xenlab.errors import ConfigError, GuestError
from xenlab.guest.manager import Guests
from xenlab.lab.core import Lab
from xenlab.paths import cache_dir
from xenlab.xenstore.client import XenStore
from xenlab.xenstore.recorder import traced
from xenlab.xenstore.tracer import check, format_reports, violation_summary

ACTIONS = ("ls", "load", "unload", "reload", "restore")


@dataclass(frozen=True)
class Dom0Kernel:
    """The kernel a lab's dom0 runs (or would boot): release, suite, and the
    modules tree when it is a kernel of the user's."""

    release: str
    suite: str
    user_modules: str = ""


def dom0_kernel(lab: Lab) -> Dom0Kernel:
    """The lab's running dom0 when it is up, else the one `xenlab up` would boot."""
    info = lab.info()
    cfg = lab.running_config()
    boot = (info or {}).get("boot") or {}
    if info and boot.get("user_dom0_kernel"):
        return Dom0Kernel(boot["dom0_release"], cfg.dom0.suite, boot["user_dom0_modules"])
    if not info and cfg.dom0.kernel:
        return Dom0Kernel(read_kernel(cfg.dom0.kernel, option="--dom0-kernel").release, cfg.dom0.suite, cfg.dom0.modules)
    if info:
        return Dom0Kernel(boot.get("dom0_release") or
                          dom0_image.Dom0Image(dom0_image.images_dir() / info["image_id"]).manifest["kernel_version"], cfg.dom0.suite)
    image = dom0_image.find(cfg)
    if image is None:
        raise ConfigError(f"no dom0 image is built for lab {lab.name!r} ({cfg.dom0.suite}): its kernel is not known yet",
                          "build it first: `xenlab build` (or `xenlab up`)")
    return Dom0Kernel(image.manifest["kernel_version"], cfg.dom0.suite)


def kernel_dir(lab: Lab) -> Path:
    """The directory to build modules for dom0's kernel against: Debian's
    headers of exactly its release (fetched and extracted once), or for a
    dom0 kernel of the user's its modules tree's `build` link."""
    return _build_dir(dom0_kernel(lab))


def _build_dir(kernel: Dom0Kernel) -> Path:
    if kernel.user_modules:
        return headers.user_kernel_dir(modules_dir(kernel.user_modules, kernel.release))
    return headers.debian_kernel_dir(kernel.release, kernel.suite, cache_dir() / "dom0-headers")


def source_dir(lab: Lab) -> Path:
    """The source of dom0's kernel, to patch a backend: for Debian's kernel,
    the host's linux-source tree (xenlab's copy, the minimal guest kernel's)
    when it is the same version; for a kernel of the user's, its build
    directory's `source` link (or the build directory: an in-tree build)."""
    kernel = dom0_kernel(lab)
    build = _build_dir(kernel)
    if kernel.user_modules:
        return (build / "source").resolve() if (build / "source").is_dir() else build
    want = headers.makefile_version(build)
    tree = kernel_mod.minimal_source(cache_dir() / "guest")
    have = headers.makefile_version(tree)
    if have != want:
        raise ConfigError(f"the host's linux-source is Linux {have or '?'}, but dom0's kernel is {want or '?'}: its backends' source differs",
                          "install the host's linux-source package of dom0's kernel version, or rebuild dom0 (`xenlab build --force`)")
    return tree


def _kinds_of(module: str, mod: ModuleFile | None) -> tuple[str, ...]:
    kinds = mod.backend_kinds if mod else ()
    kinds = kinds or STOCK_BACKEND_KINDS.get(module, ())
    if not kinds:
        raise ConfigError(f"{mod.path if mod else module} is not a backend xenlab can swap: it serves no vbd or vif devices"
                          + (" (no xen-backend:vbd or xen-backend:vif alias)" if mod else ""),
                          "xenlab swaps the kernel's block and network backends: xen-blkback, xen-netback (a frontend: `xenlab guest module`)")
    swappable = {kind for served in STOCK_BACKEND_KINDS.values() for kind in served}
    unknown = [k for k in kinds if k not in swappable]
    if unknown:
        raise ConfigError(f"{module} serves {', '.join(unknown)} devices, which xenlab cannot take away and give back (only vbd and vif)",
                          "load it by hand in dom0 (`xenlab ssh -- insmod FILE`) if no guest uses it")
    return kinds


def listing(guests: Guests) -> dict:
    """`dom0 module ls`: dom0's backend modules (origin, file, size, devices served) and devices waiting."""
    now = guests.agent("backendswap", "state")
    rows = []
    names = set(STOCK_BACKEND_KINDS) | set(now["records"])
    for module in sorted(names):
        record = now["records"].get(module, {})
        kinds = STOCK_BACKEND_KINDS.get(module, ())
        rows.append({"name": module, "loaded": module in now["loaded"], "size": now["loaded"].get(module),
                     "origin": record.get("origin", "stock" if module in now["loaded"] else "not loaded"),
                     "file": "" if record.get("file", "-") == "-" else record["file"],
                     "devices": [f"{d['guest'] or d['domid']}:{d['kind']}/{d['devid']}" for d in now["devices"] if d["kind"] in kinds]})
    waiting = [f"{name}:{r['kind']}/{r['devid']}" for name, records in now["pending"].items() for r in records]
    return {"release": now["release"], "modules": rows, "unplugged": waiting}


def _check_unmounted(guests: Guests, served: list[dict]) -> None:
    """A guest's mounted disk cannot be taken away cleanly (xl would force it): refuse first."""
    for name in sorted({d["guest"] for d in served if d["kind"] == "vbd" and d["xenlab"]}):
        mounted = sorted(set(guests.exec(name, MOUNTED_DISKS, timeout=60).stdout.split()))
        if mounted:
            raise disks_in_use(name, mounted, "; dom0's module is unchanged")


def change(guests: Guests, action: str, path: str = "", module: str = "", params: str = "",
           echo: Callable[[str], None] | None = None, timeout: float = 60) -> dict:
    """load, unload, reload or restore a backend module in dom0, every guest
    device it serves taken away and given back around it, traced. Returns
    the outcome, dom0's kernel lines, each device's handshake verdicts;
    raises GuestError when the new module did not load (saying which one
    dom0 has now)."""
    if action not in ACTIONS[1:]:
        raise ConfigError(f"unknown module action {action!r}", ", ".join(ACTIONS))
    check_params(params, "max_ring_page_order=0")
    mod = read_module(path) if action in ("load", "reload") else None
    module = mod.name if mod else module.removesuffix(".ko").replace("-", "_")
    kinds = _kinds_of(module, mod)
    now = guests.agent("backendswap", "state")
    release = now["release"]
    if mod and mod.release != release:
        raise ConfigError(f"module {mod.path} was built for kernel {mod.release}, but dom0 runs {release}",
                          "rebuild it against dom0's kernel: make -C \"$(xenlab dom0 kernel-dir)\" M=$PWD modules")
    if action in ("unload", "reload", "restore"):
        _check_unmounted(guests, [d for d in now["devices"] if d["kind"] in kinds])
    mode = {"load": "load", "reload": "ship", "unload": "unload", "restore": "stock"}[action]
    remote = ""
    if mod:
        # Gzipped through one command: a module with its debug info packs to a third.
        remote = f"{LOADED_DIR}/{module}-{secrets.token_hex(3)}.ko"
        guests.ssh().check(f"mkdir -p {LOADED_DIR} && zcat > {remote}", input=gzip.compress(mod.data, compresslevel=6), timeout=120)
    args = ["swap", module, "--kinds", ",".join(kinds), "--mode", mode, "--timeout", str(timeout)]
    args += ["--file", remote] if remote else []
    args += ["--params", params] if params else []
    with XenStore.for_lab(guests.lab, timeout=10) as store, traced(store, None, echo=echo) as recorder:
        swap = guests.agent("backendswap", *args, timeout=timeout * 4 + 120)
        timeline = list(recorder.timeline)
    for name in sorted({p["guest"] for p in swap["plugged"] if p["kind"] == "vif"}):
        guests.exec(name, NET_UP, timeout=30)  # a new eth0: its address back
    reports = check(timeline)
    result = {"module": module, "action": action, "file": str(mod.path) if mod else "", "release": release,
              "outcome": swap["outcome"], "kernel_log": swap.get("kernel_log", []),
              "unplugged": swap["unplugged"], "plugged": swap["plugged"],
              "devices": [r.to_dict() for r in reports], "verdicts": format_reports(reports), "violation": violation_summary(reports)}
    if swap.get("left"):
        log = "\n".join(swap.get("kernel_log", [])[-12:])
        raise GuestError(f"{module} is in dom0 ({', '.join(swap['outcome'])}), but devices did not come back: "
                         + "; ".join(f"{x['guest']}: {x['error']}" for x in swap["left"]),
                         ("dom0's kernel log:\n" + log) if log else "see `xenlab dom0 module ls` and `xenlab console`")
    if "insmod-failed" in swap["outcome"]:
        now = (f"dom0 has its old {module} back, its devices given back to it" if "old-back" in swap["outcome"] else
               f"dom0 has no {module} now (its devices wait: `xenlab dom0 module load FILE` or `restore {module}` gives them back)")
        log = "\n".join(swap.get("kernel_log", [])[-12:])
        raise GuestError(f"{path or module} did not load in dom0: {swap.get('error') or 'insmod failed'}; {now}",
                         ("dom0's kernel log:\n" + log) if log else "see `xenlab console`")
    return result


def module_command(guests: Guests, action: str, target: str = "", params: str = "",
                   echo: Callable[[str], None] | None = None, timeout: float = 60) -> dict:
    """`xenlab dom0 module ACTION [TARGET] [PARAMS]`: ls, load FILE, unload NAME, reload FILE, restore NAME."""
    if action == "ls":
        return listing(guests)
    by_name = action in ("unload", "restore")
    if action in ACTIONS and not target:
        raise ConfigError(f"`dom0 module {action}` needs " + ("the module's name" if by_name else "the .ko file"),
                          f"e.g. xenlab dom0 module {action} " + ("xen-blkback" if by_name else "./xen-blkback.ko"))
    if by_name:
        return change(guests, action, module=target, echo=echo, timeout=timeout)
    return change(guests, action, path=target, params=params, echo=echo, timeout=timeout)
