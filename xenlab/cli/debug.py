"""`xenlab debug ...`: gdb on the lab VM, guest stacks, guest cores and Xen's
debug keys (the library: xenlab.debug; docs/debugging.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

from xenlab.cli.common import emit, json_option, lab_option, open_lab
from xenlab.debug import gdb, xentrace
from xenlab.debug import keys as debug_keys
from xenlab.debug import stack as debug_stack
from xenlab.guest import coredump


@click.group()
def debug():
    """Debugging a dom0/domU pair: gdb, guest stacks, cores, Xen's debug keys."""


@debug.command("gdb", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@lab_option
@click.option("--print-command", is_flag=True, help="print gdb's command line instead of running it")
@click.argument("gdb_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def gdb_cmd(ctx, lab, print_command, gdb_args):
    """gdb attached to the lab VM through QEMU's gdbstub (127.0.0.1 only),
    with Xen's and dom0's symbols; GDB_ARGS after `--` go to gdb (e.g.
    `-batch -ex 'info registers rip'`). Quitting gdb leaves the lab running."""
    session = gdb.session(open_lab(ctx, lab), list(gdb_args))
    for note in session.notes:
        click.echo(f"note: {note}", err=True)
    if print_command:
        click.echo(subprocess.list2cmdline(session.argv))
        return
    click.echo(f"gdb: attached to QEMU's gdbstub on 127.0.0.1:{session.port} (the VM stops while gdb holds it)", err=True)
    sys.exit(subprocess.call(session.argv))


@debug.command("stack")
@lab_option
@click.argument("guest")
@click.option("--vcpu", type=int, default=None, help="one vCPU (default: all)")
@json_option
@click.pass_context
def stack_cmd(ctx, lab, guest, vcpu, as_json):
    """GUEST's registers and kernel stack (Xen's xenctx), named by its kernel's System.map."""
    data = debug_stack.guest_stack(open_lab(ctx, lab), guest, vcpu)

    def text(s):
        if not s.symbol_map:
            click.echo("note: no System.map for this guest's kernel: addresses only", err=True)
        click.echo(s.text.rstrip())

    emit(data.to_dict() if as_json else data, as_json, text)


@debug.command("keys")
@lab_option
@click.argument("keys")
@click.option("--force", is_flag=True, help="also press keys that take the lab down (R reboots, % traps into xendbg)")
@json_option
@click.pass_context
def keys_cmd(ctx, lab, keys, force, as_json):
    """Press Xen debug KEYS and print just what each printed: `e` event
    channels, `g` grant tables, `q` domains, ...; `h` lists this Xen's keys."""
    lab_obj = open_lab(ctx, lab)
    outputs = debug_keys.press(lab_obj, keys, force)

    def text(outs):
        for out in outs:
            click.echo(f"== '{out.key}': {out.description}")
            if not out.complete:
                click.echo(f"note: the dump outgrew Xen's console ring; all of it is in {lab_obj.serial_log}", err=True)
            click.echo("\n".join(out.lines))

    emit([o.to_dict() for o in outputs] if as_json else outputs, as_json, text)


@debug.command("core")
@lab_option
@click.argument("guest")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="where the core folder goes (default: the lab's cores/ folder, which keeps the newest 5)")
@json_option
@click.pass_context
def core_cmd(ctx, lab, guest, out_dir, as_json):
    """Take GUEST's core (`xl dump-core`; the guest is paused meanwhile) with its kernel and System.map."""
    lab_obj = open_lab(ctx, lab)
    with lab_obj.guests() as guests:
        data = guests.dump_core(guest, out_dir.absolute() if out_dir else None)
    emit(data, as_json, lambda d: click.echo(
        f"core of {guest} (dom {d['domid']}, {d['bytes'] >> 20} MiB, {'crashed' if d['crashed'] else 'running'}) in {d['core_dir']}"))


@debug.command("core-log")
@click.argument("folder", type=click.Path(path_type=Path, exists=True))
@click.option("--panic", is_flag=True, help="only the last oops/panic and its call trace")
@json_option
def core_log_cmd(folder, panic, as_json):
    """The guest kernel's log read out of a core (FOLDER from `debug core` or a
    crashed guest's destroy, or a core file with System.map beside it)."""
    core = folder / coredump.CORE_FILE if folder.is_dir() else folder
    lines = coredump.kernel_log(core, core.parent / coredump.MAP_FILE)
    if panic:
        lines = coredump.panic_report(lines)
    emit({"core": str(core), "lines": lines}, as_json, lambda d: click.echo("\n".join(d["lines"])))


@debug.command("xentrace", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@lab_option
@click.option("--events", default="evtchn", show_default=True,
              help=f"comma-separated Xen trace classes: {', '.join([*xentrace.GROUPS, *xentrace.CLASSES])}")
@click.option("--max-lines", default=2000, show_default=True, help="decoded lines to print at most")
@json_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def xentrace_cmd(ctx, lab, events, max_lines, as_json, command):
    """Record Xen trace events while COMMAND runs in dom0 (after `--`) and
    print them decoded (xentrace, xenalyze --dump-all)."""
    run = xentrace.record(open_lab(ctx, lab), " ".join(command), [e.strip() for e in events.split(",") if e.strip()], max_lines)

    def text(r):
        click.echo(r.output.rstrip())
        top = ", ".join(f"{name} {n}" for name, n in list(r.counts.items())[:8])
        click.echo(f"== trace ({','.join(r.classes)}, mask {r.mask:#010x}): {r.trace_bytes} bytes, {r.decoded_total} decoded lines"
                   + (f" (first {len(r.decoded)} below)" if len(r.decoded) < r.decoded_total else "") + (f"; most: {top}" if top else ""))
        click.echo("\n".join(r.decoded))

    emit(run.to_dict() if as_json else run, as_json, text)
    if run.rc:
        sys.exit(run.rc)
