"""`xenlab xs ...` (XenStore in dom0 through pyxs over SSH) and `xenlab trace`
(the XenBus state machine of a guest's devices, checked against the
split-driver protocol)."""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import click

from xenlab.cli.common import lab_option, open_lab, print_json
from xenlab.errors import ConfigError, XenlabError
from xenlab.guest.spec import DiskSpec, GuestSpec
from xenlab.verify.reports import check_output_path
from xenlab.xenstore import dumps
from xenlab.xenstore.client import DEFAULT_TIMEOUT, XenStore, XenStoreRequestError
from xenlab.xenstore.paths import check_path, parse_perms
from xenlab.xenstore.recorder import trace_guest
from xenlab.xenstore.tracer import format_reports, violation_summary
from xenlab.xenstore.tree import ls_lines


def _timeout_option(f):
    return click.option("--timeout", type=float, default=DEFAULT_TIMEOUT, show_default=True, help="seconds to wait for each XenStore reply")(f)


def _check_timeout(timeout: float) -> None:
    if timeout <= 0:
        raise XenlabError(f"--timeout must be positive, got {timeout:g}")


@contextmanager
def _store(ctx, lab, timeout):
    _check_timeout(timeout)
    with XenStore.for_lab(open_lab(ctx, lab), timeout=timeout) as xs:
        yield xs


def _paths(paths, watch=False):
    for p in paths:
        check_path(p, watch=watch)
    return paths


@click.group()
def xs():
    """XenStore in dom0: ls, read, write, rm, mkdir, perms, watch, dump.

    Talks to dom0's real xenstored (pyxs over the lab's SSH connection)."""


def _lab_cmd(f):
    return lab_option(_timeout_option(click.pass_context(f)))


@xs.command("ls")
@click.argument("path", default="/")
@click.option("-f", "full", is_flag=True, help="full paths, no truncation (as xenstore-ls -f)")
@click.option("-p", "perms", is_flag=True, help="show permissions (as xenstore-ls -p)")
@_lab_cmd
def ls_cmd(ctx, path, full, perms, lab, timeout):
    """The tree under PATH, printed exactly as dom0's xenstore-ls prints it."""
    _paths([path])
    with _store(ctx, lab, timeout) as store:
        lines = ls_lines(store, path, full=full, perms=perms)
    for line in lines:
        click.echo(line)


@xs.command("read")
@click.argument("paths", nargs=-1, required=True)
@_lab_cmd
def read_cmd(ctx, paths, lab, timeout):
    """Print the value of each PATH, one per line."""
    _paths(paths)
    with _store(ctx, lab, timeout) as store:
        for p in paths:
            click.echo(store.read(p))


@xs.command("write")
@click.argument("pairs", nargs=-1, required=True, metavar="PATH VALUE [PATH VALUE]...")
@_lab_cmd
def write_cmd(ctx, pairs, lab, timeout):
    """Write each VALUE to its PATH (all in one transaction)."""
    if len(pairs) % 2:
        raise XenlabError(f"`xs write` takes PATH VALUE pairs; {pairs[-1]!r} has no value", "e.g. xenlab xs write /local/domain/0/x 1")
    items = list(zip(pairs[::2], pairs[1::2], strict=True))
    _paths([p for p, _ in items])
    with _store(ctx, lab, timeout) as store:
        store.transaction(lambda tx: [tx.write(p, v) for p, v in items])


@xs.command("rm")
@click.argument("paths", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="no error if PATH does not exist")
@_lab_cmd
def rm_cmd(ctx, paths, force, lab, timeout):
    """Remove each PATH and everything under it."""
    _paths(paths)
    with _store(ctx, lab, timeout) as store:
        for p in paths:
            # xenstored accepts removing a missing node whose parent exists;
            # a user asking to remove something that is not there wants to know.
            if not force and not store.exists(p):
                raise XenStoreRequestError("rm", p, 2)
            store.rm(p)


@xs.command("mkdir")
@click.argument("paths", nargs=-1, required=True)
@_lab_cmd
def mkdir_cmd(ctx, paths, lab, timeout):
    """Create each PATH (and missing parents) with an empty value."""
    _paths(paths)
    with _store(ctx, lab, timeout) as store:
        for p in paths:
            store.mkdir(p)


@xs.command("perms")
@click.argument("path")
@click.argument("perms", nargs=-1)
@click.option("--json", "as_json", is_flag=True)
@_lab_cmd
def perms_cmd(ctx, path, perms, as_json, lab, timeout):
    """Show PATH's permissions, or set them: PERMS like `n0 r5 b7`.

    The first entry names the owner and what every other domain may do;
    each further entry grants one domain (n none, r read, w write, b both)."""
    _paths([path])
    wanted = parse_perms(perms) if perms else None
    with _store(ctx, lab, timeout) as store:
        if wanted:
            store.set_perms(path, wanted)
        current = store.get_perms(path)
    if as_json:
        click.echo(json.dumps([{"access": p.access, "domid": p.domid} for p in current]))
    else:
        click.echo(" ".join(str(p) for p in current))


@xs.command("watch")
@click.argument("paths", nargs=-1, required=True)
@click.option("-n", "--count", type=int, default=0, help="stop after this many events (0: until interrupted)")
@click.option("--for", "duration", type=float, default=0, help="stop after this many seconds (0: until interrupted)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per event")
@_lab_cmd
def watch_cmd(ctx, paths, count, duration, as_json, lab, timeout):
    """Stream change events under each PATH until interrupted (Ctrl-C).

    xenstored fires one event per watched path as the watch is set up."""
    _paths(paths, watch=True)
    seen = 0
    start = time.time()
    deadline = time.monotonic() + duration if duration > 0 else None
    with _store(ctx, lab, timeout) as store, store.watch(*paths) as watch:
        try:
            while not count or seen < count:
                wait = 1.0 if deadline is None else deadline - time.monotonic()
                if wait <= 0:
                    break
                ev = watch.get(min(wait, 1.0))
                if ev is None:
                    continue
                seen += 1
                if as_json:
                    click.echo(json.dumps({"path": ev.path, "watch": ev.watch, "time": ev.time}))
                else:
                    click.echo(f"+{ev.time - start:9.3f} s  {ev.path}")
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass


@xs.command("dump")
@click.argument("path", required=False)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE", help="save the dump to FILE (JSON, for --diff later)")
@click.option("--diff", "since", type=click.Path(path_type=Path), metavar="FILE", help="print what changed since the dump in FILE")
@click.option("--ignore", multiple=True, metavar="GLOB", help="with --diff: leave out paths matching GLOB (repeatable; * crosses '/')")
@click.option("--json", "as_json", is_flag=True, help="the dump, or with --diff the changes, as JSON")
@_lab_cmd
def dump_cmd(ctx, path, out, since, ignore, as_json, lab, timeout):
    """The whole tree under PATH (default /) with values and permissions;
    --out FILE saves it, --diff FILE prints what changed since FILE's dump
    (+ added, - removed, ~ value or permissions changed).

    With --diff, PATH defaults to the path FILE was dumped from."""
    before = dumps.load(since) if since else None  # a bad FILE fails before connecting
    if ignore and not before:
        raise ConfigError("--ignore goes with --diff", "e.g. xenlab xs dump --diff before.json --ignore '/vm/*'")
    ignore = dumps.check_ignore(ignore)
    path = path or (before["path"] if before else "/")
    _paths([path])
    if before:
        dumps.check_covers(before, path, str(since))
    _check_timeout(timeout)
    the_lab = open_lab(ctx, lab)
    with XenStore.for_lab(the_lab, timeout=timeout) as store:
        if not (out or before or as_json):
            for line in ls_lines(store, path, full=True, perms=True):
                click.echo(line)
            return
        # With --diff a PATH that is gone now is an empty tree: all of it was removed.
        now = dumps.take(store, path, lab=the_lab.name, missing_ok=before is not None)
    if out:
        dumps.save(now, out)
        click.echo(f"{len(now['nodes'])} nodes under {path} saved to {out}", err=True)
    if before:
        changes = dumps.diff(before["nodes"], now["nodes"], under=path, ignore=ignore)
        was = f"the dump in {since} (lab {before.get('lab') or '?'}, taken {before.get('taken') or '?'})"
        if as_json:
            print_json({"format": dumps.FORMAT, "lab": now["lab"], "path": path, "taken": now["taken"],
                        "since": {"file": str(since), "lab": before.get("lab"), "taken": before.get("taken")}, **changes})
        else:
            for line in dumps.format_diff(changes):
                click.echo(line)
        click.echo(f"{path} since {was}: {dumps.summary(changes)}", err=True)
    elif as_json:
        print_json(now)


# -- trace ---------------------------------------------------------------------

@click.command("trace")
@click.argument("guest")
@lab_option
@click.option("--create", "do_create", is_flag=True, help="create GUEST (busybox root) and trace its devices coming up")
@click.option("--disk", "disks", multiple=True, metavar="SIZE[:ro]", help="with --create: a disk, repeatable (default one 16M disk)")
@click.option("--net/--no-net", default=True, help="with --create: a NIC (default on)")
@click.option("--root", default="busybox", show_default=True, help="with --create: the guest's root (busybox or python)")
@click.option("--destroy", "do_destroy", is_flag=True, help="destroy GUEST (xl destroy) and trace its devices going away")
@click.option("--for", "duration", type=float, default=0, help="without --create/--destroy: trace this many seconds (0: until Ctrl-C)")
@click.option("--settle", type=float, default=15, show_default=True, help="seconds to wait for the last state changes after the action")
@click.option("--json", "as_json", is_flag=True, help="timeline and per-device verdicts as JSON")
@click.option("--html", "html_path", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="also write the timeline as a picture: one HTML page, a lane per frontend and backend")
@_timeout_option
@click.pass_context
def trace(ctx, guest, lab, do_create, disks, net, root, do_destroy, duration, settle, as_json, html_path, timeout):
    """Trace GUEST's XenBus states: every change of each vbd/vif frontend and
    backend `state` node, timestamped, checked against the split-driver
    protocol. Exits non-zero on a protocol violation."""
    if do_create and do_destroy:
        raise XenlabError("--create and --destroy trace different things", "run `xenlab trace GUEST --create`, then `--destroy`")
    _check_timeout(timeout)
    check_output_path(html_path, "--html")
    spec = None
    if do_create:
        spec = GuestSpec(
            name=guest, memory=128 if root == "python" else 64, disks=tuple(DiskSpec.parse(d) for d in (disks or ("16M",))),
            net=net, root=root,
        ).validate()
    action = "create" if do_create else "destroy" if do_destroy else "watch"
    the_lab = open_lab(ctx, lab)
    run = trace_guest(the_lab, guest, action, spec, duration, settle, timeout, echo=None if as_json else click.echo, html=html_path)
    reports, timeline = run["devices"], run["timeline"]
    if as_json:
        print_json({**run, "timeline": [c.to_dict() for c in timeline], "devices": [r.to_dict() for r in reports]})
    else:
        if not timeline:
            click.echo(f"no XenBus device state of guest {guest!r} seen")
        click.echo("")
        for line in format_reports(reports):
            click.echo(line)
    if html_path is not None:
        click.echo(f"timeline page: {html_path}", err=as_json)
    problem = violation_summary(reports)
    if problem:
        raise XenlabError(problem, "the timeline above shows the offending transition")
