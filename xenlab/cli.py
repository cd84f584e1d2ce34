"""The xenlab command line."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from . import config as config_mod
from .errors import XenlabError
from .orchestrate import images
from .orchestrate.lab import Lab, list_labs
from .progress import Steps, console


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


def name_option(f):
    return click.option("--name", default=None, envvar="XENLAB_NAME", help="lab name (default: [lab] name, 'default')")(f)


def load_config(ctx, **overrides) -> config_mod.LabConfig:
    return config_mod.load(ctx.obj.get("config"), overrides)


def print_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(cls=XenlabGroup)
@click.option("--config", "config_file", type=click.Path(path_type=Path), envvar="XENLAB_CONFIG", help="a TOML file over configs/default.toml")
@click.option("--debug", is_flag=True, help="log every command and show tracebacks")
@click.version_option(package_name="xenlab")
@click.pass_context
def main(ctx, config_file, debug):
    """A real nested Xen lab (Xen + Debian dom0 under QEMU/libvirt) for PV driver work."""
    ctx.obj = {"config": config_file, "debug": debug}
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(name)s: %(message)s")


@main.command("config")
@name_option
@click.option("--json", "as_json", is_flag=True, help="print the resolved config as JSON")
@click.pass_context
def config_cmd(ctx, name, as_json):
    """Print the resolved configuration."""
    cfg = load_config(ctx, name=name)
    if as_json:
        print_json(cfg.to_dict())
    else:
        for key, value in cfg.to_dict().items():
            click.echo(f"{key} = {value}")


@main.command()
@click.option("--no-probe", is_flag=True, help="skip booting a kernel under KVM")
@click.option("--json", "as_json", is_flag=True)
def doctor(no_probe, as_json):
    """Check the host: tools, libvirt, space, memory, KVM or TCG."""
    from .doctor import checks

    results = checks(probe_kvm=not no_probe)
    if as_json:
        print_json([r.__dict__ for r in results])
    else:
        table = Table("check", "ok", "detail", "fix")
        for r in results:
            table.add_row(r.name, "[green]yes[/]" if r.ok else "[red]NO[/]", r.detail, "" if r.ok else r.fix)
        console.print(table)
    bad = [r.name for r in results if not r.ok]
    if bad:
        raise XenlabError(f"host problems: {', '.join(bad)}", "apply the fixes above (ci/setup-host.sh installs the packages)")


@main.command()
@click.option("--force", is_flag=True, help="rebuild even if the recipe is cached")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def build(ctx, force, as_json):
    """Build (once, cached by recipe) the dom0 image and Xen boot files."""
    cfg = load_config(ctx)
    steps = Steps()
    image = images.build(cfg, steps, force=force)
    result = {"image_id": image.id, "path": str(image.path), "timings": steps.timings, "build_seconds": image.manifest["build_seconds"]}
    if as_json:
        print_json(result)
    else:
        console.print(f"dom0 image [bold]{image.id}[/] at {image.path}")


@main.command()
@name_option
@click.option("--connect", default=None, help="libvirt URI (default: embedded driver, no daemon)")
@click.option("--accel", type=click.Choice(config_mod.ACCELS), default=None)
@click.option("--memory", default=None, help="lab VM memory, e.g. 2048M or 2G")
@click.option("--dom0-memory", default=None, help="dom0 memory, e.g. 1024M")
@click.option("--vcpus", type=int, default=None)
@click.option("--cpu", type=click.Choice(config_mod.CPUS), default=None, help="TCG CPU model")
@click.option("--ssh-port", type=int, default=None)
@click.option("--json", "as_json", is_flag=True, help="print the ready report as JSON")
@click.pass_context
def up(ctx, name, connect, accel, memory, dom0_memory, vcpus, cpu, ssh_port, as_json):
    """Build what is missing and boot Xen + dom0; returns when dom0 is ready."""
    cfg = load_config(ctx, name=name, connect=connect, accel=accel, memory=memory, vcpus=vcpus, cpu=cpu, ssh_port=ssh_port, **{"dom0.memory": dom0_memory})
    steps = Steps()
    info = Lab(cfg).up(steps)
    if as_json:
        print_json(info)
    else:
        console.print(
            f"[green]lab {info['name']} is up[/] in {info['up_seconds']:.1f} s (boot {info['boot_seconds']:.1f} s, {info['accel'].upper()}); "
            f"SSH: xenlab ssh --name {info['name']} (127.0.0.1:{info['ssh_port']}); serial log: {info['serial_log']}"
        )


@main.command()
@name_option
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def down(ctx, name, as_json):
    """Stop the lab: no QEMU, no port, no libvirt domain left. Idempotent."""
    result = Lab(load_config(ctx, name=name)).down()
    if as_json:
        print_json(result)
    else:
        console.print(f"lab {result['name']} {'stopped' if result['was_running'] else 'was not running'}")


@main.command()
@name_option
@click.option("--json", "as_json", is_flag=True)
@click.option("--all", "all_labs", is_flag=True, help="every lab with state on this host")
@click.pass_context
def status(ctx, name, as_json, all_labs):
    """Xen version, dom0, domains, accel, SSH port, image, uptime."""
    names = list_labs() if all_labs else [name]
    reports = [Lab(load_config(ctx, name=n)).status() for n in names]
    if as_json:
        print_json(reports if all_labs else reports[0])
        return
    for report in reports:
        if report["state"] != "up":
            console.print(f"lab {report['name']}: {report['state']}" + (f" ({report['hint']})" if "hint" in report else ""))
            continue
        table = Table(title=f"lab {report['name']}: up", show_header=False)
        for key in ("xen_version", "accel", "cpu", "ssh_port", "image_id", "uptime_seconds", "boot_seconds", "uri", "serial_log"):
            table.add_row(key, str(report[key]))
        table.add_row("dom0", f"{report['dom0']['memory_mib']} MiB, {report['dom0']['vcpus']} vcpus")
        table.add_row("domains", ", ".join(f"{d['name']}({d['id']})" for d in report["domains"]))
        console.print(table)


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@name_option
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def ssh(ctx, name, command):
    """A shell in dom0, or run COMMAND there with its output and exit code."""
    lab = Lab(load_config(ctx, name=name))
    if not command:
        argv = lab.openssh_argv()
        os.execvp(argv[0], argv)
    with lab.ssh() as session:
        result = session.run(" ".join(command), timeout=3600)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    ctx.exit(result.exit_status)


@main.command()
@name_option
@click.option("-n", "--lines", default=40, help="how many lines of the tail")
@click.option("-f", "--follow", is_flag=True, help="keep printing new lines")
@click.pass_context
def console_cmd(ctx, name, lines, follow):
    """Where the serial log (Xen + dom0 console) is, and its tail."""
    lab = Lab(load_config(ctx, name=name))
    path = lab.serial_log
    if not path.exists():
        raise XenlabError(f"no serial log for lab {lab.name} ({path})", f"start the lab with `xenlab up --name {lab.name}`")
    click.echo(f"serial log: {path}")
    argv = ["tail", "-n", str(lines)] + (["-F"] if follow else []) + [str(path)]
    subprocess.run(argv)


main.add_command(console_cmd, "console")
main.add_command(console_cmd, "logs")

from .cli_guest import guest  # noqa: E402

main.add_command(guest)

from .cli_xs import register as _register_xs  # noqa: E402

_register_xs(main)
from .cli_evtchn import register as _register_evtchn; _register_evtchn(main)  # noqa: E402, E702
from .cli_verify import register as _register_verify; _register_verify(main)  # noqa: E402, E702
