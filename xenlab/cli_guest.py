"""`xenlab guest ...`: PV domUs in the lab."""

from __future__ import annotations

import sys
from contextlib import contextmanager

import click
from rich.markup import escape
from rich.table import Table

from .errors import XenlabError
from .guest import rootfs
from .guest.manager import DiskSpec, Guests, GuestSpec
from .orchestrate.lab import Lab
from .progress import Steps, console


@contextmanager
def _maybe_traced(ctx, lab_name: str | None, guest_name: str, enabled: bool, destroying: bool, echo):
    """With --trace: record the guest's XenBus states around the action, then
    print the timeline's verdict; a protocol violation fails the command."""
    if not enabled:
        yield
        return
    from .cli_xs import _settled, _store, traced
    from .xenstore.tracer import check as check_timeline, format_reports

    with _store(ctx, lab_name, 10) as store, traced(store, guest_name, echo=echo) as recorder:
        yield
        recorder.wait(_settled(destroying), 15)
    reports = check_timeline(recorder.timeline)
    if echo:
        for line in format_reports(reports):
            echo(line)
    bad = [f for r in reports for f in r.findings if f.level == "violation"]
    if bad:
        raise XenlabError(f"XenBus protocol violation: {bad[0]}", "the timeline above shows the offending transition")


def _guests(ctx, name) -> Guests:
    from .cli import load_config

    return Guests(Lab(load_config(ctx, name=name)))


def lab_option(f):
    return click.option("--lab", "lab_name", default=None, envvar="XENLAB_NAME", help="lab name (default: 'default')")(f)


@click.group()
def guest():
    """PV domUs: create, list, exec, check, console, destroy."""


@guest.command("build")
@click.option("--force", is_flag=True, help="rebuild the minimal kernel even if cached")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def build_cmd(ctx, force, as_json):
    """Build (cached) the minimal guest kernel and the guest roots; no lab needed."""
    import json as json_mod

    from .cli import load_config, print_json
    from .guest import kernel as kernel_mod
    from .guest.manager import minimal_vmlinux
    from .orchestrate import images
    from .paths import cache_dir

    steps = Steps(quiet=as_json)
    image = images.build(load_config(ctx), steps)
    with steps.step("minimal guest kernel (guest-kernel/minimal.config; about 4 min on 2 cores when not cached)"):
        bzimage = kernel_mod.build_minimal_kernel(cache_dir() / "guest", force=force)
        minimal_vmlinux(bzimage)
    result = {"kernel": str(bzimage), "kernel_manifest": json_mod.loads((bzimage.parent / "manifest.json").read_text()), "roots": {}}
    for root in rootfs.ROOTS:
        for kernel in rootfs.KERNELS:
            with steps.step(f"guest root {root} for the {kernel} kernel"):
                path = rootfs.build(image, root, kernel, cache_dir() / "guest")
            result["roots"][f"{root}/{kernel}"] = {"path": str(path), "bytes": path.stat().st_size}
    if as_json:
        print_json(result)
    else:
        console.print(f"kernel {bzimage} (built in {result['kernel_manifest']['build_seconds']} s)")
        for key, r in result["roots"].items():
            console.print(f"root {key}: {r['path']} ({r['bytes'] >> 10} KiB)")


@guest.command()
@lab_option
@click.argument("name")
@click.option("--memory", default="128M", show_default=True, help="guest memory (32M+; 96M+ for --root python)")
@click.option("--vcpus", type=int, default=1, show_default=True)
@click.option("--disk", "disks", multiple=True, metavar="SIZE[:ro]", help="a blkfront disk (xvda, xvdb, ...), repeatable, e.g. 64M or 16M:ro")
@click.option("--net/--no-net", default=False, help="a netfront NIC on dom0's xenbr0 (guest gets 10.99.0.x)")
@click.option("--kernel", type=click.Choice(rootfs.KERNELS), default="minimal", show_default=True, help="minimal: built from guest-kernel/; debian: dom0's kernel + modules")
@click.option("--root", type=click.Choice(rootfs.ROOTS), default="busybox", show_default=True, help="python adds python3 and the xenlab agents")
@click.option("--type", "guest_type", default="pv", show_default=True, help="guest type (pv)")
@click.option("--timeout", type=float, default=120, show_default=True, help="seconds to wait until the guest is up and Connected")
@click.option("--extra", default="", help="appended to the guest kernel command line")
@click.option("--hotplug", type=click.Choice(("xenlab", "stock")), default="xenlab", show_default=True,
              help="xenlab: small sh hotplug scripts; stock: Xen's /etc/xen/scripts/{block,vif-bridge}")
@click.option("--trace", is_flag=True, help="trace the XenBus states of its devices coming up (as `xenlab trace`)")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def create(ctx, lab_name, name, memory, vcpus, disks, net, kernel, root, guest_type, timeout, extra, hotplug, trace, as_json):
    """Start a PV domU; returns when it is up and every vbd/vif is Connected."""
    from .cli import print_json
    from .config import parse_mib

    spec = GuestSpec(
        name=name, memory=parse_mib(memory, "--memory"), vcpus=vcpus, disks=tuple(DiskSpec.parse(d) for d in disks),
        net=net, kernel=kernel, root=root, type=guest_type, timeout=timeout, extra=extra, hotplug=hotplug,
    ).validate()
    steps = Steps(quiet=as_json)
    with _guests(ctx, lab_name) as guests:
        with steps.step(f"guest {name}: build/ship kernel and root"):
            prepared = guests.prepare(spec)
        with _maybe_traced(ctx, lab_name, name, trace, False, None if as_json else click.echo):
            with steps.step(f"guest {name}: xl create, wait for Connected"):
                info = guests.create(spec, prepared)
    if as_json:
        print_json(info)
        return
    t = info["timings"]
    devs = ", ".join(f"{d['kind']}/{d['devid']}" for d in info["devices"]) or "no devices"
    console.print(
        f"[green]guest {name} is up[/] (domid {info['domid']}, {info['ip'] if info['net'] else 'no net'}): "
        f"xl create {t['xl_create']:.1f} s, all Connected {t['connected']:.1f} s, ready {t['ready']:.1f} s; {devs}"
    )


@guest.command("list")
@lab_option
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def list_cmd(ctx, lab_name, as_json):
    """The lab's guests with domid, state, memory, disks, address."""
    from .cli import print_json

    with _guests(ctx, lab_name) as guests:
        rows = guests.list()
    if as_json:
        print_json(rows)
        return
    table = Table("name", "domid", "state", "memory", "vcpus", "root/kernel", "disks", "ip")
    for g in rows:
        disks = " ".join(f"{d['vdev']}:{d['size_mib']}M{':ro' if d['readonly'] else ''}" for d in g.get("disks", []))
        table.add_row(g["name"], str(g.get("domid", "")), g["state"], f"{g.get('memory', '')}M", str(g.get("vcpus", "")),
                      f"{g.get('root')}/{g.get('kernel')}", disks, g.get("ip", "") if g.get("net") else "")
    console.print(table)


@guest.command()
@lab_option
@click.argument("name")
@click.option("--timeout", type=float, default=30, show_default=True, help="seconds to wait for backends to go away")
@click.option("--trace", is_flag=True, help="trace the XenBus states of its devices going away")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def destroy(ctx, lab_name, name, timeout, trace, as_json):
    """Destroy a guest and remove its disks; reports anything left in dom0."""
    from .cli import print_json

    with _guests(ctx, lab_name) as guests, _maybe_traced(ctx, lab_name, name, trace, True, None if as_json else click.echo):
        result = guests.destroy(name, timeout=timeout)
    left = {k: v for k, v in result["leftovers"].items() if v}
    if as_json:
        print_json(result)
    else:
        console.print(f"guest {name} (domid {result['domid']}) destroyed in {result['seconds']:.1f} s")
    if left:
        raise XenlabError(f"guest {name} left things behind in dom0: {left}", "see `xenlab ssh -- xenstore-ls -f /local/domain/0/backend`")


@guest.command("console")
@lab_option
@click.argument("name")
@click.option("-n", "--lines", default=40, show_default=True)
@click.option("--attach", is_flag=True, help="interactive `xl console` (Ctrl-] leaves); stops exec while attached")
@click.pass_context
def console_cmd(ctx, lab_name, name, lines, attach):
    """The guest console log (its path in dom0 and tail), or attach to it."""
    from .cli import load_config

    if attach:
        import os

        argv = Lab(load_config(ctx, name=lab_name)).openssh_argv("xl", "console", name, tty=True)
        os.execvp(argv[0], argv)
    with _guests(ctx, lab_name) as guests:
        result = guests.console(name, lines)
    click.echo(f"console log (dom0): {result['log']}")
    click.echo(result["tail"])


@guest.command("exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@lab_option
@click.option("--timeout", type=float, default=120, show_default=True)
@click.option("--stdin", "use_stdin", is_flag=True, help="send this command's stdin to CMD")
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def exec_cmd(ctx, lab_name, timeout, use_stdin, name, command):
    """Run CMD in the guest: its stdout, stderr and exit code (over the Xen console)."""
    if command and command[0] == "--":
        command = command[1:]
    data = sys.stdin.buffer.read() if use_stdin else b""
    with _guests(ctx, lab_name) as guests:
        result = guests.exec(name, " ".join(command), input=data, timeout=timeout)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    ctx.exit(result.exit_status)


@guest.command()
@lab_option
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def check(ctx, lab_name, name, as_json):
    """Ring I/O on the real paths: blkfront<->blkback byte-exact both ways, read-only refusal, netfront<->netback ping and bulk."""
    from .cli import print_json

    with _guests(ctx, lab_name) as guests:
        results = guests.check(name)
    if as_json:
        print_json(results)
    else:
        table = Table("check", "result", "time", "evidence")
        for r in results:
            table.add_row(r["check"], "[green]SUCCESS[/]" if r["ok"] else "[red]FAILURE[/]", f"{r['seconds']:.1f} s", escape(r["detail"]))
        console.print(table)
    failed = [r["check"] for r in results if not r["ok"]]
    if failed:
        raise XenlabError(f"guest {name}: {len(failed)} check(s) failed: {', '.join(failed)}")
