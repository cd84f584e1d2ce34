"""What every xenlab command shares: the error handling group, the one lab
option, config loading and "JSON or text" output."""

from __future__ import annotations

import json
from collections.abc import Callable

import click
from rich.markup import escape

from xenlab import config as config_mod
from xenlab.api import Lab
from xenlab.errors import XenlabError
from xenlab.progress import console


class XenlabGroup(click.Group):
    """Turns XenlabError into message + hint + exit code; tracebacks only with --debug."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except XenlabError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            console.print(f"[bold red]error:[/] {escape(e.message)}")
            if e.hint:
                console.print(f"[yellow]hint:[/] {escape(e.hint)}")
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            console.print("[red]interrupted[/]")
            ctx.exit(130)


class _LabOption(click.Option):
    """--lab, with --name accepted as a hidden alias (the lab commands used to
    spell it so; --lab cannot be mistaken for a guest's NAME)."""

    def get_help_record(self, ctx):
        record = super().get_help_record(ctx)
        return ("--lab LAB", record[1]) if record else record


def lab_option(f):
    """The lab a command works on, as `lab` (None: [lab] name from the config, 'default')."""
    return click.option("--lab", "--name", "lab", cls=_LabOption, default=None, envvar="XENLAB_NAME",
                        help="the lab's name (default: $XENLAB_NAME, else [lab] name, 'default')")(f)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="print the result as JSON")(f)


def module_arguments(f):
    """ACTION [TARGET] [PARAMS...] --timeout --json: `guest module` and `dom0 module`."""
    for decorate in reversed((
        click.argument("action", type=click.Choice(("ls", "load", "unload", "reload", "restore"))),
        click.argument("target", required=False, default=""),
        click.argument("params", nargs=-1),
        click.option("--timeout", type=float, default=60, show_default=True, help="seconds each device gets to close down and to connect again"),
        json_option,
    )):
        f = decorate(f)
    return f


def load_config(ctx: click.Context, **overrides) -> config_mod.LabConfig:
    return config_mod.load(ctx.obj.get("config"), overrides)


def open_lab(ctx: click.Context, lab: str | None) -> Lab:
    return Lab(load_config(ctx, name=lab))


def print_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def emit(data, as_json: bool, text: Callable[[object], None]) -> None:
    """JSON when asked, else the command's own text rendering."""
    if as_json:
        print_json(data)
    else:
        text(data)


MODULE_VERBS = {"load": "loaded", "unload": "unloaded", "reload": "reloaded", "restore": "back to stock"}


def emit_module_table(result: dict, as_json: bool, title: str, waiting: dict[str, str]) -> None:
    """`guest module ... ls` and `dom0 module ls`: one row per module, then the
    devices under each key of `waiting` (what they are)."""
    from rich.table import Table

    def table(r):
        t = Table(title=title)
        for col in ("module", "origin", "size", "devices", "file"):
            t.add_column(col)
        for m in r["modules"]:
            t.add_row(m["name"] + ("" if m["loaded"] else " (not loaded)"), m["origin"], str(m["size"] or ""),
                      ", ".join(m["devices"]), escape(m["file"]))
        console.print(t)
        for key, what in waiting.items():
            if r[key]:
                console.print(f"{what}: {', '.join(r[key])}")
    emit(result, as_json, table)


def emit_module_change(result: dict, action: str, as_json: bool, where: str, moved: str) -> None:
    """A module swap's kernel lines, handshake verdicts and outcome; exit 1 on a protocol violation."""
    def text(r):
        for line in r["kernel_log"]:
            click.echo(f"  {line}")
        for line in r["verdicts"]:
            click.echo(line)
        console.print(f"[green]{r['module']} {MODULE_VERBS[action]} in {where}[/]" + ("" if action == "unload" else f"; {moved}"))
    emit(result, as_json, text)
    if result["violation"]:
        raise XenlabError(f"the XenBus handshake broke the protocol: {result['violation']}", "the timeline above shows the offending transition")
