"""The lab commands: config, doctor, build, up, down, status, ssh, console."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
from rich.table import Table

from xenlab import config as config_mod
from xenlab.build import dom0
from xenlab.cli.common import emit, json_option, lab_option, load_config, open_lab, print_json
from xenlab.doctor import checks
from xenlab.errors import XenlabError
from xenlab.lab import Lab, list_labs
from xenlab.progress import Steps, console
from xenlab.transfer import copy


@click.command("config")
@lab_option
@click.option("--json", "as_json", is_flag=True, help="print the resolved config as JSON")
@click.pass_context
def config_cmd(ctx, lab, as_json):
    """Print the resolved configuration."""
    cfg = load_config(ctx, name=lab)
    emit(cfg.to_dict(), as_json, lambda d: [click.echo(f"{key} = {value}") for key, value in d.items()])


@click.command()
@click.option("--no-probe", is_flag=True, help="skip booting a kernel under KVM")
@json_option
def doctor(no_probe, as_json):
    """Check the host: tools, libvirt, space, memory, KVM or TCG."""
    results = checks(probe_kvm=not no_probe)

    def text(results):
        table = Table("check", "ok", "detail", "fix")
        for r in results:
            table.add_row(r.name, "[green]yes[/]" if r.ok else "[red]NO[/]", r.detail, "" if r.ok else r.fix)
        console.print(table)

    emit([r.__dict__ for r in results] if as_json else results, as_json, text)
    bad = [r.name for r in results if not r.ok]
    if bad:
        raise XenlabError(f"host problems: {', '.join(bad)}", "apply the fixes above (ci/setup-host.sh installs the packages)")


@click.command()
@click.option("--force", is_flag=True, help="rebuild even if the recipe is cached")
@json_option
@click.pass_context
def build(ctx, force, as_json):
    """Build (once, cached by recipe) the dom0 image and Xen boot files."""
    steps = Steps()
    image = dom0.build(load_config(ctx), steps, force=force)
    result = {"image_id": image.id, "path": str(image.path), "timings": steps.timings, "build_seconds": image.manifest["build_seconds"]}
    emit(result, as_json, lambda r: console.print(f"dom0 image [bold]{image.id}[/] at {image.path}"))


@click.command()
@lab_option
@click.option("--connect", default=None, help="libvirt URI (default: embedded driver, no daemon)")
@click.option("--accel", type=click.Choice(config_mod.ACCELS), default=None)
@click.option("--memory", default=None, help="lab VM memory, e.g. 2048M or 2G")
@click.option("--dom0-memory", default=None, help="dom0 memory, e.g. 1024M")
@click.option("--vcpus", type=int, default=None)
@click.option("--cpu", type=click.Choice(config_mod.CPUS), default=None, help="TCG CPU model")
@click.option("--ssh-port", type=int, default=None)
@click.option("--xen", default=None, metavar="FILE", help="boot your own Xen (xen.gz or xen from your build)")
@click.option("--dom0-kernel", default=None, metavar="FILE", help="boot your own dom0 kernel (bzImage or vmlinux)")
@click.option("--dom0-modules", default=None, metavar="DIR", help="with --dom0-kernel: its modules_install tree")
@click.option("--json", "as_json", is_flag=True, help="print the ready report as JSON")
@click.pass_context
def up(ctx, lab, connect, accel, memory, dom0_memory, vcpus, cpu, ssh_port, xen, dom0_kernel, dom0_modules, as_json):
    """Build what is missing and boot Xen + dom0; returns when dom0 is ready."""
    cfg = load_config(ctx, name=lab, connect=connect, accel=accel, memory=memory, vcpus=vcpus, cpu=cpu, ssh_port=ssh_port,
                      xen=_absolute(xen), **{"dom0.memory": dom0_memory, "dom0.kernel": _absolute(dom0_kernel), "dom0.modules": _absolute(dom0_modules)})
    info = Lab(cfg).up(Steps())
    emit(info, as_json, lambda i: console.print(
        f"[green]lab {i['name']} is up[/] in {i['up_seconds']:.1f} s (boot {i['boot_seconds']:.1f} s, {i['accel'].upper()}); "
        f"SSH: xenlab ssh --lab {i['name']} (127.0.0.1:{i['ssh_port']}); serial log: {i['serial_log']}"))


def _absolute(path: str | None) -> str | None:
    """A path as given on the command line, made independent of where later commands run."""
    return str(Path(path).expanduser().absolute()) if path else None


@click.command()
@lab_option
@json_option
@click.pass_context
def down(ctx, lab, as_json):
    """Stop the lab: no QEMU, no port, no libvirt domain left. Idempotent."""
    result = open_lab(ctx, lab).down()
    emit(result, as_json, lambda r: console.print(f"lab {r['name']} {'stopped' if r['was_running'] else 'was not running'}"))


@click.command()
@lab_option
@json_option
@click.option("--all", "all_labs", is_flag=True, help="every lab with state on this host")
@click.pass_context
def status(ctx, lab, as_json, all_labs):
    """Xen version, dom0, domains, accel, SSH port, image, uptime."""
    names = list_labs() if all_labs else [lab]
    reports = [open_lab(ctx, n).status() for n in names]
    if as_json:
        print_json(reports if all_labs else reports[0])
        return
    for report in reports:
        if report["state"] != "up":
            console.print(f"lab {report['name']}: {report['state']}" + (f" ({report['hint']})" if "hint" in report else ""))
            continue
        table = Table(title=f"lab {report['name']}: up", show_header=False)
        for key in ("xen_version", "xen_build_id", "dom0_kernel_release", "accel", "cpu", "ssh_port", "image_id", "uptime_seconds",
                    "boot_seconds", "uri", "serial_log"):
            table.add_row(key, str(report[key]))
        own = {k: v for k, v in report["boot"].items() if k.startswith("user_") and v}
        if own:
            table.add_row("your files", ", ".join(f"{k.removeprefix('user_')}: {v}" for k, v in own.items()))
        table.add_row("qemu / libvirt", " / ".join(report["versions"].get(k, "?") for k in ("qemu", "libvirt")))
        table.add_row("dom0", f"{report['dom0']['memory_mib']} MiB, {report['dom0']['vcpus']} vcpus")
        table.add_row("domains", ", ".join(f"{d['name']}({d['id']})" for d in report["domains"]))
        console.print(table)


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@lab_option
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def ssh(ctx, lab, command):
    """A shell in dom0, or run COMMAND there as OpenSSH does: output as it
    comes, this command's stdin forwarded, COMMAND's exit code. Like OpenSSH,
    the words of COMMAND are joined into one command line for dom0's shell."""
    the_lab = open_lab(ctx, lab)
    if not command:
        argv = the_lab.openssh_argv()
        os.execvp(argv[0], argv)
    with the_lab.ssh() as session:
        stdin = sys.stdin.buffer if sys.stdin is not None else None
        status = session.stream(" ".join(command), stdin, sys.stdout.buffer, sys.stderr.buffer)
    ctx.exit(status)


@click.command("console")
@lab_option
@click.option("-n", "--lines", default=40, help="how many lines of the tail")
@click.option("-f", "--follow", is_flag=True, help="keep printing new lines")
@click.pass_context
def console_cmd(ctx, lab, lines, follow):
    """Where the serial log (Xen + dom0 console) is, and its tail."""
    the_lab = open_lab(ctx, lab)
    path = the_lab.serial_log
    if not path.exists():
        raise XenlabError(f"no serial log for lab {the_lab.name} ({path})", f"start the lab with `xenlab up --lab {the_lab.name}`")
    click.echo(f"serial log: {path}")
    subprocess.run(["tail", "-n", str(lines)] + (["-F"] if follow else []) + [str(path)])


@click.command("cp")
@lab_option
@click.argument("src")
@click.argument("dest")
@json_option
@click.pass_context
def cp(ctx, lab, src, dest, as_json):
    """Copy a file between this host and dom0 or a guest, as scp does.

    SRC and DEST: a host path, dom0:PATH, or GUEST:PATH (a guest's name).
    Content and mode are kept; guests need no network (the copy goes over
    their console). Exit 1 when the copy fails, 2 for bad arguments."""
    result = copy(open_lab(ctx, lab), src, dest)
    emit(result, as_json, lambda r: None)
