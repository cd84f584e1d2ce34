"""`xenlab dom0 ...`: dom0's kernel, for a backend author: its build
directory and its backend modules, swapped under the guests they serve."""

from __future__ import annotations

import click
from rich.markup import escape
from rich.table import Table

from xenlab.cli.common import emit, json_option, lab_option, open_lab
from xenlab.errors import XenlabError
from xenlab.progress import Steps, console


@click.group()
def dom0():
    """dom0's kernel: kernel-dir (to build modules against), module (its backends)."""


@dom0.command("kernel-dir")
@lab_option
@click.option("--source", is_flag=True, help="print the source tree of dom0's kernel instead (to copy a backend from)")
@click.pass_context
def kernel_dir_cmd(ctx, lab, source):
    """Print the build directory of dom0's kernel, to build modules against:
    make -C "$(xenlab dom0 kernel-dir)" M=$PWD modules

    Debian's headers of exactly dom0's kernel (fetched with the host's apt
    sources and cached on first use; no root), or for `up --dom0-kernel` the
    modules tree's `build` link. Also what a `guest create --kernel debian`
    module builds against. With --source: Debian's linux-source of the
    same version (the host's, extracted once), or your kernel's source."""
    from xenlab.drivers.dom0 import kernel_dir, source_dir

    with Steps().step("dom0 kernel " + ("source (cached)" if source else "build directory (cached)")):
        found = (source_dir if source else kernel_dir)(open_lab(ctx, lab))
    click.echo(found)


@dom0.command("module")
@lab_option
@click.argument("action", type=click.Choice(("ls", "load", "unload", "reload", "restore")))
@click.argument("target", required=False, default="")
@click.argument("params", nargs=-1)
@click.option("--timeout", type=float, default=60, show_default=True, help="seconds each device gets to close down and to connect again")
@json_option
@click.pass_context
def module_cmd(ctx, lab, action, target, params, timeout, as_json):
    """dom0's backend modules: ls; load FILE.ko [PARAMS]; unload NAME; reload
    FILE.ko [PARAMS]; restore NAME (Debian's own module back). Every guest
    device the backend serves is taken away (a clean XenBus closedown) and
    given back once the new module is in (a fresh bring-up), all traced; a
    module that does not load leaves the old one in."""
    from xenlab.drivers.dom0 import module_command

    with open_lab(ctx, lab).guests() as guests:
        result = module_command(guests, action, target, " ".join(params), echo=None if as_json else click.echo, timeout=timeout)
    if action == "ls":
        def table(r):
            t = Table(title=f"dom0's backend modules (Linux {r['release']})")
            for col in ("module", "origin", "size", "devices", "file"):
                t.add_column(col)
            for m in r["modules"]:
                t.add_row(m["name"], m["origin"], str(m["size"] or ""), ", ".join(m["devices"]), escape(m["file"]))
            console.print(t)
            if r["unplugged"]:
                console.print(f"devices waiting to be given back: {', '.join(r['unplugged'])}")
        emit(result, as_json, table)
        return

    def text(r):
        for line in r["kernel_log"]:
            click.echo(f"  {line}")
        for line in r["verdicts"]:
            click.echo(line)
        moved = ", ".join(f"{p['guest']}:{p['kind']}/{p['devid']}" for p in r["plugged"]) or "no devices"
        verb = {"load": "loaded", "unload": "unloaded", "reload": "reloaded", "restore": "back to stock"}[action]
        console.print(f"[green]{r['module']} {verb} in dom0[/]" + ("" if action == "unload" else f"; {moved} served by it"))

    emit(result, as_json, text)
    if result["violation"]:
        raise XenlabError(f"the XenBus handshake broke the protocol: {result['violation']}", "the timeline above shows the offending transition")
