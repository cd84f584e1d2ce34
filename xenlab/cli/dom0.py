"""`xenlab dom0 ...`: dom0's kernel, for a backend author: its build
directory and its backend modules, swapped under the guests they serve."""

from __future__ import annotations

import click

from xenlab.cli.common import emit_module_change, emit_module_table, lab_option, module_arguments, open_lab
from xenlab.progress import Steps


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
@module_arguments
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
        emit_module_table(result, as_json, f"dom0's backend modules (Linux {result['release']})",
                          {"unplugged": "devices waiting to be given back"})
        return
    moved = ", ".join(f"{p['guest']}:{p['kind']}/{p['devid']}" for p in result["plugged"]) or "no devices"
    emit_module_change(result, action, as_json, "dom0", f"{moved} served by it")
