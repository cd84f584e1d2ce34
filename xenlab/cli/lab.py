"""The lab commands: config, doctor, build, up, reset, down, status, ssh, console, snapshot."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click
from rich.table import Table

from xenlab import config as config_mod
from xenlab.agent.facts import XEN_VERSIONS
from xenlab.api import Lab
from xenlab.build import dom0
from xenlab.cli.common import emit, json_option, lab_option, load_config, open_lab, print_json
from xenlab.doctor import checks
from xenlab.errors import XenlabError
from xenlab.lab import list_labs
from xenlab.lab import snapshot as snapshots
from xenlab.paths import QEMU_STACKS
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


SUITE_HELP = f"Debian suite of dom0 and its Xen ({', '.join(f'{s}: {v}' for s, v in XEN_VERSIONS.items())})"


@click.command()
@click.option("--force", is_flag=True, help="rebuild even if the recipe is cached")
@click.option("--suite", type=click.Choice(config_mod.SUITES), default=None, help=SUITE_HELP)
@json_option
@click.pass_context
def build(ctx, force, suite, as_json):
    """Build (once, cached by recipe) the dom0 image and Xen boot files."""
    steps = Steps()
    image = dom0.build(load_config(ctx, **{"dom0.suite": suite}), steps, force=force)
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
@click.option("--suite", type=click.Choice(config_mod.SUITES), default=None, help=SUITE_HELP)
@click.option("--ssh-port", type=int, default=None)
@click.option("--xen", default=None, metavar="FILE", help="boot your own Xen (xen.gz or xen from your build)")
@click.option("--dom0-kernel", default=None, metavar="FILE", help="boot your own dom0 kernel (bzImage or vmlinux)")
@click.option("--dom0-modules", default=None, metavar="DIR", help="with --dom0-kernel: its modules_install tree")
@click.option("--qemu", default=None, metavar="STACK|FILE", help="stock, backports, or a qemu-system-x86_64's path "
              "(default: [lab] qemu, else backports when installed; docs/versions.md)")
@click.option("--cold", is_flag=True, help="boot from scratch even if a matching snapshot exists (a new one replaces it)")
@click.option("--json", "as_json", is_flag=True, help="print the ready report as JSON")
@click.pass_context
def up(ctx, lab, connect, accel, memory, dom0_memory, vcpus, cpu, suite, ssh_port, xen, dom0_kernel, dom0_modules, qemu, cold, as_json):
    """Build what is missing and boot Xen + dom0; returns when dom0 is ready.

    The first boot of a configuration is saved as a snapshot; later `up`s
    of the same configuration restore it in seconds ("restored")."""
    cfg = load_config(ctx, name=lab, connect=connect, accel=accel, memory=memory, vcpus=vcpus, cpu=cpu, ssh_port=ssh_port,
                      xen=_absolute(xen), qemu=qemu if qemu in QEMU_STACKS else _absolute(qemu),
                      **{"dom0.memory": dom0_memory, "dom0.suite": suite, "dom0.kernel": _absolute(dom0_kernel), "dom0.modules": _absolute(dom0_modules)})
    info = Lab(cfg).up(Steps(), cold=cold)
    emit(info, as_json, _print_ready)


def _print_ready(i: dict) -> None:
    snap = i.get("snapshot") or {}
    if snap.get("saved_now"):
        how = f"cold boot {snap['cold_boot_seconds']:.1f} s, saved as snapshot {snap['key']}"
    elif snap:
        how = f"restored from snapshot {snap['key']} in {i['boot_seconds']:.1f} s"
    else:
        how = f"cold boot {i['boot_seconds']:.1f} s"
    console.print(f"[green]lab {i['name']} is up[/] in {i['up_seconds']:.1f} s ({how}, {i['accel'].upper()}); "
                  f"SSH: xenlab ssh --lab {i['name']} (127.0.0.1:{i['ssh_port']}); serial log: {i['serial_log']}")


@click.command()
@lab_option
@json_option
@click.pass_context
def reset(ctx, lab, as_json):
    """Put a running lab back to its state right after boot, in place: all
    guests gone, dom0's memory and disk as after boot (from its snapshot;
    a cold boot when there is none, saying why)."""
    emit(open_lab(ctx, lab).reset(Steps()), as_json, _print_ready)


@click.group()
def snapshot():
    """Snapshots of booted labs (cache entries, like images)."""


@snapshot.command("ls")
@json_option
def snapshot_ls(as_json):
    """Every snapshot: key, lab, image, size on disk, labs using it."""
    found = snapshots.describe_all()

    def text(rows):
        table = Table("key", "saved by lab", "created", "image", "memory", "qemu/libvirt", "disk", "used by", "problem")
        for r in rows:
            table.add_row(r["key"], str(r["lab"]), time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created_at"] or 0)),
                          str(r["image_id"]), f"{r['memory_mib']}M", f"{r['qemu']}/{r['libvirt']}",
                          f"{r['disk_bytes'] / 2**20:.0f} MiB", ", ".join(r["used_by"]) or "-", r["problem"] or "")
        console.print(table)
        console.print(f"{len(rows)} snapshot(s), {sum(r['disk_bytes'] for r in rows) / 2**20:.0f} MiB in {snapshots.snapshots_dir()}")

    emit(found, as_json, text)


@snapshot.command("rm")
@click.argument("keys", nargs=-1)
@click.option("--all", "all_snapshots", is_flag=True, help="every snapshot no running lab uses")
@json_option
def snapshot_rm(keys, all_snapshots, as_json):
    """Remove snapshots by key (a lab running from one keeps it until `xenlab down`)."""
    removed = snapshots.remove(list(keys), every=all_snapshots)
    emit({"removed": removed}, as_json, lambda r: console.print(f"removed {len(r['removed'])} snapshot(s) {' '.join(r['removed'])}"))


@snapshot.command("prune")
@json_option
def snapshot_prune(as_json):
    """Keep each lab's newest snapshot and those in use; remove the rest and interrupted saves."""
    removed = snapshots.prune()
    emit({"removed": removed}, as_json, lambda r: console.print(f"removed {len(r['removed'])} snapshot(s) {' '.join(r['removed'])}"))


def _absolute(path: str | None) -> str | None:
    """A path as given on the command line, made independent of where later commands run."""
    return str(Path(path).expanduser().absolute()) if path else None


@click.command()
@lab_option
@json_option
@click.option("--forget", is_flag=True, help="a remote lab whose host is gone for good: drop only this machine's record of it")
@click.pass_context
def down(ctx, lab, as_json, forget):
    """Stop the lab: no QEMU, no port, no libvirt domain left. Idempotent."""
    result = open_lab(ctx, lab).down(forget=forget)
    emit(result, as_json, lambda r: console.print(
        f"lab {r['name']}: " + ("record dropped; nothing on its host was touched" if forget
                                else "stopped" if r["was_running"] else "was not running")))


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
        if report["snapshot"]:
            table.add_row("snapshot", f"{report['snapshot']} ({'restored from it' if report['restored'] else 'saved'})")
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
    """Where the serial log (Xen + dom0 console) is, and its tail (also: `xenlab logs`)."""
    the_lab = open_lab(ctx, lab)
    shown = the_lab.console_lines(lines, follow)
    click.echo(f"serial log: {the_lab.serial_log}")
    try:
        for line in shown:
            click.echo(line)
    except KeyboardInterrupt:
        pass


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
