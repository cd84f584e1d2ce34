"""`xenlab guest ...`: domUs (PV, PVH, HVM) in the lab."""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from xenlab.build import kernel as kbuild
from xenlab.build.guest import build_all
from xenlab.cli.common import emit, emit_module_change, emit_module_table, json_option, lab_option, load_config, module_arguments, open_lab
from xenlab.config import parse_mib
from xenlab.errors import XenlabError
from xenlab.guest.spec import ROOTS, DiskSpec, GuestSpec
from xenlab.paths import cache_dir
from xenlab.progress import Steps, console
from xenlab.xenstore.recorder import trace_action


def _traced(ctx, lab: str | None, guest_name: str, enabled: bool, destroying: bool, as_json: bool):
    """With --trace: the guest's XenBus states around the action, then the verdict."""
    if not enabled:
        return nullcontext()
    return trace_action(open_lab(ctx, lab), guest_name, destroying, echo=None if as_json else click.echo)


@click.group()
def guest():
    """domUs (PV, PVH or HVM): create, list, exec, check, console, destroy."""


def _tree_options(f):
    f = click.option("--config", "fragment", default=None, metavar="FRAGMENT",
                     help="with --kernel-tree: your Kconfig fragment, merged after xenlab's")(f)
    return click.option("--kernel-tree", "tree", default=None, metavar="DIR",
                         help="your Linux source tree, built out of tree (O=) with xenlab's fragment merged in")(f)


@guest.command("build")
@click.option("--force", is_flag=True, help="rebuild (reconfigure) even if cached")
@_tree_options
@json_option
@click.pass_context
def build_cmd(ctx, force, tree, fragment, as_json):
    """Build (cached) the minimal guest kernel and the guest roots, or with
    --kernel-tree your own Linux tree; no lab needed.

    A tree is built out of tree (it stays clean), cached by its content: an
    unchanged tree is not rebuilt, a changed one incrementally. Prints its
    bzImage (give it to `guest create --kernel`), vmlinux and build directory."""
    steps = Steps(quiet=as_json)
    if fragment and not tree:
        raise XenlabError("--config goes with --kernel-tree", "the minimal kernel's fragment is xenlab/data/guest-kernel/minimal.config")
    if tree:
        with steps.step(f"kernel tree {tree}"):
            built = kbuild.build_tree(Path(tree), cache_dir() / "guest", fragment and Path(fragment), force=force)
        emit(built.to_dict(), as_json, lambda r: console.print(
            f"bzImage {r['bzimage']}\nvmlinux {r['vmlinux']}\nbuild dir {r['build_dir']}\n"
            f"release {r['release']}; {r['compiled']} files compiled" + (" (the tree was unchanged)" if not r["compiled"] else "")))
        return
    result = build_all(load_config(ctx), steps, force=force)

    def text(r):
        console.print(f"kernel {r['kernel']} ({r['kernel_build']['release']}; build dir {r['kernel_build']['build_dir']})")
        for key, root in r["roots"].items():
            console.print(f"root {key}: {root['path']} ({root['bytes'] >> 10} KiB)")

    emit(result, as_json, text)


@guest.command("kernel-dir")
@_tree_options
def kernel_dir_cmd(tree, fragment):
    """Print the guest kernel's build directory, to build modules against:
    make -C "$(xenlab guest kernel-dir)" M=$PWD modules

    The minimal kernel's, or with --kernel-tree that tree's (built if needed)."""
    if fragment and not tree:
        raise XenlabError("--config goes with --kernel-tree", "the minimal kernel's fragment is xenlab/data/guest-kernel/minimal.config")
    with Steps().step("guest kernel (cached)"):
        built = (kbuild.build_tree(Path(tree), cache_dir() / "guest", fragment and Path(fragment)) if tree
                 else kbuild.build_minimal(cache_dir() / "guest"))
    click.echo(built.build_dir)


@guest.command()
@lab_option
@click.argument("name")
@click.option("--memory", default="128M", show_default=True, help="guest memory (32M+; 96M+ for --root python)")
@click.option("--vcpus", type=int, default=1, show_default=True)
@click.option("--disk", "disks", multiple=True, metavar="SIZE[:ro]", help="a blkfront disk (xvda, xvdb, ...), repeatable, e.g. 64M or 16M:ro")
@click.option("--net/--no-net", default=False, help="a netfront NIC on dom0's bridge (the guest gets an address there)")
@click.option("--kernel", default="minimal", show_default=True, metavar="minimal|debian|FILE",
              help="minimal: xenlab's own small kernel; debian: dom0's kernel + modules; FILE: your bzImage or vmlinux")
@click.option("--modules", default="", metavar="DIR", help="your kernel modules (.ko files or a modules_install tree), put into the guest")
@click.option("--load", multiple=True, metavar="'MODULE [PARAMS]'", help="load this module of --modules at boot, before the guest is ready (repeatable, in order)")
@click.option("--add", multiple=True, metavar="SRC:DEST", help="put a host file (or directory) into the guest at DEST (repeatable)")
@click.option("--no-stock", "no_stock", multiple=True, metavar="MODULE",
              help="keep this stock module of the kernel off at boot, e.g. xen-blkfront for a frontend of your own (repeatable); "
                   "a module of --modules by a stock name replaces it without this")
@click.option("--root", type=click.Choice(ROOTS), default="busybox", show_default=True, help="python adds python3 and the xenlab agents")
@click.option("--type", "guest_type", default="pv", show_default=True, help="pv; pvh or hvm need --kernel debian or your kernel and an SVM CPU model, "
              "and under TCG a 1-vCPU lab on Xen 4.20 (--suite trixie) or on QEMU 7.2 (--qemu stock)")
@click.option("--timeout", type=float, default=None,
              help="seconds to wait until the guest is up and Connected  [default: 120 for pv, 240 for pvh, 360 for hvm]")
@click.option("--extra", default="", help="appended to the guest kernel command line")
@click.option("--hotplug", type=click.Choice(("xenlab", "stock")), default="xenlab", show_default=True,
              help="xenlab: small sh hotplug scripts; stock: Xen's /etc/xen/scripts/{block,vif-bridge}")
@click.option("--trace", is_flag=True, help="trace the XenBus states of its devices coming up (as `xenlab trace`)")
@json_option
@click.pass_context
def create(ctx, lab, name, memory, vcpus, disks, net, kernel, modules, load, add, no_stock, root, guest_type, timeout, extra, hotplug, trace, as_json):
    """Start a domU (PV unless --type); returns when it is up and every vbd/vif is Connected
    (and every --load module is loaded)."""
    spec = GuestSpec(
        name=name, memory=parse_mib(memory, "--memory"), vcpus=vcpus, disks=tuple(DiskSpec.parse(d) for d in disks),
        net=net, kernel=kernel, root=root, type=guest_type, timeout=timeout, extra=extra, hotplug=hotplug,
        modules=modules, load=tuple(load), add=tuple(add), no_stock=tuple(no_stock),
    ).validate()
    steps = Steps(quiet=as_json)
    with open_lab(ctx, lab).guests() as guests:
        with steps.step(f"guest {name}: build/ship kernel and root"):
            prepared = guests.prepare(spec)
        with _traced(ctx, lab, name, trace, False, as_json):
            with steps.step(f"guest {name}: xl create, wait for Connected"):
                info = guests.create(spec, prepared)

    def text(info):
        t = info["timings"]
        devs = ", ".join(f"{d['kind']}/{d['devid']}" for d in info["devices"]) or "no devices"
        console.print(
            f"[green]guest {name} is up[/] (domid {info['domid']}, {info['ip'] if info['net'] else 'no net'}): "
            f"xl create {t['xl_create']:.1f} s, all Connected {t['connected']:.1f} s, ready {t['ready']:.1f} s; {devs}"
        )

    emit(info, as_json, text)


@guest.command("list")
@lab_option
@json_option
@click.pass_context
def list_cmd(ctx, lab, as_json):
    """The lab's guests with domid, state, memory, disks, address."""
    with open_lab(ctx, lab).guests() as guests:
        rows = guests.list()

    def text(rows):
        table = Table("name", "domid", "state", "memory", "vcpus", "root/kernel", "disks", "ip")
        for g in rows:
            disks = " ".join(f"{d['vdev']}:{d['size_mib']}M{':ro' if d['readonly'] else ''}" for d in g.get("disks", []))
            table.add_row(g["name"], str(g.get("domid", "")), g["state"], f"{g.get('memory', '')}M", str(g.get("vcpus", "")),
                          f"{g.get('root')}/{g.get('kernel')}", disks, g.get("ip", "") if g.get("net") else "")
        console.print(table)

    emit(rows, as_json, text)


@guest.command()
@lab_option
@click.argument("name")
@click.option("--timeout", type=float, default=30, show_default=True, help="seconds to wait for backends to go away")
@click.option("--trace", is_flag=True, help="trace the XenBus states of its devices going away")
@json_option
@click.pass_context
def destroy(ctx, lab, name, timeout, trace, as_json):
    """Destroy a guest and remove its disks; reports anything left in dom0."""
    with open_lab(ctx, lab).guests() as guests, _traced(ctx, lab, name, trace, True, as_json):
        result = guests.destroy(name, timeout=timeout)
    emit(result, as_json, lambda r: console.print(
        f"guest {name} (domid {r['domid']}) destroyed in {r['seconds']:.1f} s"
        + (f"; it had crashed: its core is in {r['core_dir']} (`xenlab debug core-log DIR --panic`)" if "core_dir" in r else "")))
    left = {k: v for k, v in result["leftovers"].items() if v}
    if left:
        raise XenlabError(f"guest {name} left things behind in dom0: {left}", "see `xenlab ssh -- xenstore-ls -f /local/domain/0/backend`")


@guest.command("console")
@lab_option
@click.argument("name")
@click.option("-n", "--lines", default=40, show_default=True)
@click.option("--attach", is_flag=True, help="interactive `xl console` (Ctrl-] leaves); stops exec while attached")
@click.pass_context
def console_cmd(ctx, lab, name, lines, attach):
    """The guest console log (its path in dom0 and tail), or attach to it."""
    the_lab = open_lab(ctx, lab)
    if attach:
        argv = the_lab.openssh_argv("xl", "console", name, tty=True)
        os.execvp(argv[0], argv)
    with the_lab.guests() as guests:
        result = guests.console(name, lines)
    click.echo(f"console log (dom0): {result['log']}")
    click.echo(result["tail"])


@guest.command("exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@lab_option
@click.option("--timeout", type=float, default=120, show_default=True)
@click.option("--stdin", "use_stdin", is_flag=True, help="send this command's stdin to CMD")
@click.option("--shell", "as_shell", is_flag=True, help="CMD is a shell command line (its words joined), not an argv")
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def exec_cmd(ctx, lab, timeout, use_stdin, as_shell, name, command):
    """Run CMD in the guest (over its Xen console): its stdout, stderr and exit code.

    CMD is an argv, run exactly as given (as `docker exec`): quoting survives.
    With --shell its words form one command line for the guest's shell."""
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise XenlabError("no command given", f"e.g. xenlab guest exec {name} -- uname -a")
    data = sys.stdin.buffer.read() if use_stdin else b""
    with open_lab(ctx, lab).guests() as guests:
        rc = guests.exec_stream(name, " ".join(command) if as_shell else list(command), sys.stdout.buffer, sys.stderr.buffer,
                                input=data, timeout=timeout)
    ctx.exit(rc)


@guest.command()
@lab_option
@click.argument("name")
@json_option
@click.pass_context
def check(ctx, lab, name, as_json):
    """Ring I/O on the real paths: blkfront<->blkback byte-exact both ways, read-only refusal, netfront<->netback ping and bulk."""
    with open_lab(ctx, lab).guests() as guests:
        results = guests.check(name)

    def text(results):
        table = Table("check", "result", "time", "evidence")
        for r in results:
            table.add_row(r["check"], "[green]SUCCESS[/]" if r["ok"] else "[red]FAILURE[/]", f"{r['seconds']:.1f} s", escape(r["detail"]))
        console.print(table)

    emit(results, as_json, text)
    failed = [r["check"] for r in results if not r["ok"]]
    if failed:
        raise XenlabError(f"guest {name}: {len(failed)} check(s) failed: {', '.join(failed)}")


def _faults_help() -> str:
    from xenlab.agent.faultplan import describe_faults
    return "\b\nFault plans (Python backend), comma-separated, KEY=VALUE parameters after ':' joined by ';':\n" + "\n".join(f"  {line}" for line in describe_faults())


@guest.command(epilog=_faults_help())
@lab_option
@click.argument("name")
@click.option("--disk", "size", default="16M", show_default=True, metavar="SIZE", help="size of the new, empty disk")
@click.option("--backend", type=click.Choice(("kernel", "python")), default="kernel", show_default=True,
              help="kernel blkback, or xenlab's block backend in Python (dom0 userspace)")
@click.option("--faults", default="", metavar="PLAN|FILE", help="a fault plan for the Python backend, e.g. 'io-error:sectors=0-7,slow:ms=50', or a file of one")
@click.option("--readonly", is_flag=True, help="attach read-only")
@click.option("--vdev", default="", metavar="xvdX", help="the guest's device name (default: the first free)")
@click.option("--own-frontend", is_flag=True, help="the guest drives the disk with a frontend of its own (its blkfront kept off): "
              "return once the backend waits in InitWait")
@click.option("--timeout", type=float, default=60, show_default=True, help="seconds to wait until blkfront is Connected")
@json_option
@click.pass_context
def attach(ctx, lab, name, size, backend, faults, readonly, vdev, own_frontend, timeout, as_json):
    """Attach a new disk to a running guest; its blkfront connects before this returns."""
    with open_lab(ctx, lab).guests() as guests:
        info = guests.attach(name, size, backend=backend, readonly=readonly, faults=faults, vdev=vdev, timeout=timeout,
                             own_frontend=own_frontend)
    emit(info, as_json, lambda r: console.print(
        f"{r['vdev']} attached to {name}: {r['size_mib']} MiB{' read-only' if r['readonly'] else ''}, {r['backend']} backend"
        + (f" (pid {r['pid']} in dom0, faults: {r['faults'] or 'none'})" if r["backend"] == "python" else "")
        + (f", backend waiting in InitWait after {r['seconds']:.1f} s" if r.get("own_frontend") else f", connected in {r['seconds']:.1f} s")))


@guest.command("module")
@lab_option
@click.argument("name")
@module_arguments
@click.pass_context
def module_cmd(ctx, lab, name, action, target, params, timeout, as_json):
    """A running guest's kernel modules: ls; load FILE.ko [PARAMS]; unload
    NAME; reload FILE.ko [PARAMS]; restore NAME (its stock module back). The devices a frontend module drives are
    taken away (a clean XenBus closedown) and given back to the new module
    (a fresh bring-up), both traced; a module that does not load leaves the
    old one in."""
    from xenlab.drivers.guest import module_command

    with open_lab(ctx, lab).guests() as guests:
        result = module_command(guests, name, action, target, " ".join(params), echo=None if as_json else click.echo, timeout=timeout)
    if action == "ls":
        emit_module_table(result, as_json, f"modules of {name} (Linux {result['release']})",
                          {"unbound": "devices no driver drives", "unplugged": "devices waiting to be given back"})
        return
    moved = ", ".join(f"{p['kind']}/{p['devid']}" for p in result.get("plugged", [])) or "no devices"
    emit_module_change(result, action, as_json, name, f"{moved} connected to it")


@guest.command()
@lab_option
@click.argument("name")
@click.argument("device")
@click.option("--timeout", type=float, default=30, show_default=True, help="seconds to wait for the closedown")
@json_option
@click.pass_context
def detach(ctx, lab, name, device, timeout, as_json):
    """Detach a disk attached with `guest attach` (DEVICE: xvdb or /dev/xvdb); prints the backend's report."""
    vdev = device.removeprefix("/dev/")
    with open_lab(ctx, lab).guests() as guests:
        result = guests.detach(name, vdev, timeout=timeout)

    def text(r):
        rep = r["report"]
        line = f"{vdev} detached from {name} in {r['seconds']:.1f} s ({rep.get('ended')})"
        if r["backend"] == "python":
            line += f"; {rep.get('requests', 0)} requests, {rep.get('errors', 0)} answered with an error"
            if rep.get("faults_fired"):
                line += "; faults fired: " + ", ".join(f"{k} x{v}" for k, v in rep["faults_fired"].items())
        console.print(line)

    emit(result, as_json, text)
    if result["xenstore_left"]:
        raise XenlabError(f"detaching {vdev} left XenStore nodes: {', '.join(result['xenstore_left'])}", "see `xenlab xs ls` on them")
    if "error" in result["report"]:
        raise XenlabError(f"the backend of {vdev} failed: {result['report']['error']}")
