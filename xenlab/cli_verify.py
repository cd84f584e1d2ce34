"""`xenlab verify`: boot the lab if needed, run every check, print a table,
write JSON and JUnit XML; the exit code says whether everything held."""

from __future__ import annotations

import time
from pathlib import Path

import click
from rich.markup import escape

from .progress import console
from .verify import CHECKS, VerifyError, check_output_path, exit_code, failure_message, one_line, report_dict, verify, write_reports

def table_lines(results, seconds: float, width: int = 200) -> list[str]:
    """One line per check (check, result, time, evidence), plain text so that
    CI logs keep it aligned at any terminal width."""
    w = min(max(len(r.name) for r in results), 56)
    lines = [f"{'check':<{w}}  {'result':<9}  {'time':>7}  evidence"]
    for r in results:
        state = "SKIP*" if r.state == "SKIP" and r.allowed else r.state
        head = f"{one_line(r.name, w):<{w}}  {state:<9}  {r.seconds:>6.1f}s  "
        lines.append(head + one_line(r.evidence, max(40, width - len(head))))
    lines.append(f"{len(results)} checks in {seconds:.0f} s" + ("; SKIP* = skipped on request (allowed)" if any(r.allowed for r in results) else ""))
    return lines


def print_table(results, seconds: float) -> None:
    colors = {"SUCCESS": "green", "SKIP": "yellow", "FAILURE": "red", "ERROR": "red", "CRASH": "red"}
    lines = table_lines(results, seconds)
    click.echo(lines[0])
    for r, line in zip(results, lines[1:]):
        click.echo(click.style(line, fg=colors[r.state]))  # click drops the colour when not a terminal
    click.echo(lines[-1])
    for r in results:
        if r.state == "CRASH" and r.details:
            click.echo(f"\nCRASH {r.name}: {r.evidence}\n{r.details[-3000:]}")


def register(main: click.Group) -> None:
    from .cli import load_config, name_option

    @main.command("verify")
    @name_option
    @click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="write the report as JSON to this file")
    @click.option("--junit", "junit_path", type=click.Path(path_type=Path), default=None, help="write JUnit XML to this file")
    @click.option("--guest", default="verify", show_default=True, help="name of the domU verify creates (and destroys at the end)")
    @click.option("--skip", "skips", multiple=True, metavar="CHECK", help=f"skip a check or group (repeatable; an allowed SKIP): {', '.join(CHECKS)}")
    @click.option("--guest-extra", default="", help="appended to the guest's kernel command line (debugging)")
    @click.option("--down", "stop_after", is_flag=True, help="stop the lab afterwards if verify booted it")
    @click.pass_context
    def verify_cmd(ctx, name, json_path, junit_path, guest, skips, guest_extra, stop_after):
        """Run every check against the real lab (booted if not up) and report.

        Checks: boot, dom0 services, a python domU (16M disk, 8M read-only
        disk, NIC) created with its XenBus states traced, the XenStore layout
        and permissions, block and network ring I/O, the event channel
        catalogue, the device channel, the traced destroy, and a crash scan.
        States: SUCCESS, SKIP, FAILURE, ERROR, CRASH. Exit 0 when every check
        is SUCCESS or an allowed SKIP; 1 otherwise; 3 when something crashed."""
        from .orchestrate.lab import Lab

        check_output_path(json_path, "--json")
        check_output_path(junit_path, "--junit")
        lab = Lab(load_config(ctx, name=name))
        started_at, t0 = time.time(), time.monotonic()
        results, run = verify(lab, guest=guest, skips=tuple(skips), guest_extra=guest_extra,
                              log=lambda line: console.print(escape(line), style="dim"))
        seconds = time.monotonic() - t0
        report = report_dict(lab.name, results, seconds, started_at, guest)
        write_reports(results, report, json_path, junit_path)
        print_table(results, seconds)
        for path in (json_path, junit_path):
            if path is not None:
                console.print(f"report: {path}")
        if stop_after and run.booted_here:
            lab.down()
            console.print(f"lab {lab.name} stopped (verify booted it)")
        code = exit_code(results)
        if code:
            err = VerifyError(failure_message(results), f"details: {json_path or junit_path or 'rerun with --json FILE'}; serial log: {lab.serial_log}")
            err.exit_code = code
            raise err
        console.print(f"[green]verify: all {len(results)} checks passed[/] in {seconds:.0f} s")
