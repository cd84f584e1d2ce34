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
