"""`xenlab verify`: boot the lab if needed, run every check, print a table,
write JSON and JUnit XML; the exit code says whether everything held."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from xenlab.cli.common import lab_option, open_lab
from xenlab.guest.spec import TYPES
from xenlab.progress import console
from xenlab.verify.model import CHECKS
from xenlab.verify.reports import table_lines
from xenlab.verify.runner import run


def print_table(results, seconds: float) -> None:
    colors = {"SUCCESS": "green", "SKIP": "yellow", "FAILURE": "red", "ERROR": "red", "CRASH": "red"}
    lines = table_lines(results, seconds)
    click.echo(lines[0])
    for r, line in zip(results, lines[1:], strict=False):
        click.echo(click.style(line, fg=colors[r.state]))  # click drops the colour when not a terminal
    click.echo(lines[-1])
    for r in results:
        if r.state == "CRASH" and r.details:
            click.echo(f"\nCRASH {r.name}: {r.evidence}\n{r.details[-3000:]}")


@click.command("verify")
@lab_option
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="write the report as JSON to this file")
@click.option("--junit", "junit_path", type=click.Path(path_type=Path), default=None, help="write JUnit XML to this file")
@click.option("--guest", default="verify", show_default=True, help="name of the domU verify creates (and destroys at the end)")
@click.option("--skip", "skips", multiple=True, metavar="CHECK", help=f"skip a check or group (repeatable; an allowed SKIP): {', '.join(CHECKS)}")
@click.option("--guest-extra", default="", help="appended to the guest's kernel command line (debugging)")
@click.option("--guest-type", type=click.Choice(TYPES), default="pv", show_default=True,
              help="type of the domU verify creates (pvh runs Debian's kernel: xenlab's minimal one is PV only)")
@click.option("--down", "stop_after", is_flag=True, help="stop the lab afterwards if verify booted it")
@click.pass_context
def verify(ctx, lab, json_path, junit_path, guest, skips, guest_extra, guest_type, stop_after):
    """Run every check against the real lab (booted if not up) and report.

    Checks: boot, dom0 services, a python domU (16M disk, 8M read-only
    disk, NIC) created with its XenBus states traced, the XenStore layout
    and permissions, block and network ring I/O, the event channel
    catalogue, the device channel, the traced destroy, and a crash scan.
    States: SUCCESS, SKIP, FAILURE, ERROR, CRASH. Exit 0 when every check
    is SUCCESS or an allowed SKIP; 1 otherwise; 3 when something crashed."""
    the_lab = open_lab(ctx, lab)
    outcome = run(the_lab, guest=guest, skips=tuple(skips), guest_extra=guest_extra, guest_type=guest_type, json_path=json_path, junit_path=junit_path,
                  down_after=stop_after, log=lambda line: console.print(escape(line), style="dim"))
    print_table(outcome.results, outcome.seconds)
    for path in (json_path, junit_path):
        if path is not None:
            console.print(f"report: {path}")
    if outcome.stopped:
        console.print(f"lab {the_lab.name} stopped (verify booted it)")
    error = outcome.error(the_lab)
    if error:
        raise error
    console.print(f"[green]verify: all {len(outcome.results)} checks passed[/] in {outcome.seconds:.0f} s")
