"""`xenlab xs ...` (XenStore in dom0 through pyxs over SSH) and `xenlab trace`
(the XenBus state machine of a guest's devices, checked against seed 003)."""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager

import click

from .errors import XenlabError
from .xenstore.client import DEFAULT_TIMEOUT, XenStore
from .xenstore.paths import check_path, parse_perms


def _timeout_option(f):
    return click.option("--timeout", type=float, default=DEFAULT_TIMEOUT, show_default=True, help="seconds to wait for each XenStore reply")(f)


@contextmanager
def _store(ctx, name, timeout):
    from .cli import Lab, load_config

    if timeout <= 0:
        raise XenlabError(f"--timeout must be positive, got {timeout:g}")
    xs = XenStore.for_lab(Lab(load_config(ctx, name=name)), timeout=timeout)
    try:
        yield xs
    finally:
        xs.close()


def _paths(paths, watch=False):
    for p in paths:
        check_path(p, watch=watch)
    return paths


@click.group()
def xs():
    """XenStore in dom0: ls, read, write, rm, mkdir, perms, watch, dump.

    Talks to dom0's real xenstored (pyxs over the lab's SSH connection)."""


def _lab_cmd(f):
    from .cli import name_option

    return name_option(_timeout_option(click.pass_context(f)))


@xs.command("ls")
@click.argument("path", default="/")
@click.option("-f", "full", is_flag=True, help="full paths, no truncation (as xenstore-ls -f)")
@click.option("-p", "perms", is_flag=True, help="show permissions (as xenstore-ls -p)")
@_lab_cmd
def ls_cmd(ctx, path, full, perms, name, timeout):
    """The tree under PATH, printed exactly as dom0's xenstore-ls prints it."""
    from .xenstore.tree import ls_lines

    _paths([path])
    with _store(ctx, name, timeout) as store:
        lines = ls_lines(store, path, full=full, perms=perms)
    for line in lines:
        click.echo(line)


@xs.command("read")
@click.argument("paths", nargs=-1, required=True)
@_lab_cmd
def read_cmd(ctx, paths, name, timeout):
    """Print the value of each PATH, one per line."""
    _paths(paths)
    with _store(ctx, name, timeout) as store:
        for p in paths:
            click.echo(store.read(p))


@xs.command("write")
@click.argument("pairs", nargs=-1, required=True, metavar="PATH VALUE [PATH VALUE]...")
@_lab_cmd
def write_cmd(ctx, pairs, name, timeout):
    """Write each VALUE to its PATH (all in one transaction)."""
    if len(pairs) % 2:
        raise XenlabError(f"`xs write` takes PATH VALUE pairs; {pairs[-1]!r} has no value", "e.g. xenlab xs write /local/domain/0/x 1")
    items = list(zip(pairs[::2], pairs[1::2]))
    _paths([p for p, _ in items])
    with _store(ctx, name, timeout) as store:
        store.transaction(lambda tx: [tx.write(p, v) for p, v in items])


@xs.command("rm")
@click.argument("paths", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="no error if PATH does not exist")
@_lab_cmd
def rm_cmd(ctx, paths, force, name, timeout):
    """Remove each PATH and everything under it."""
    from .xenstore.client import XenStoreRequestError

    _paths(paths)
    with _store(ctx, name, timeout) as store:
        for p in paths:
            # xenstored accepts removing a missing node whose parent exists;
            # a user asking to remove something that is not there wants to know.
            if not force and not store.exists(p):
                raise XenStoreRequestError("rm", p, 2)
            store.rm(p)


@xs.command("mkdir")
@click.argument("paths", nargs=-1, required=True)
@_lab_cmd
def mkdir_cmd(ctx, paths, name, timeout):
    """Create each PATH (and missing parents) with an empty value."""
    _paths(paths)
    with _store(ctx, name, timeout) as store:
        for p in paths:
            store.mkdir(p)


@xs.command("perms")
@click.argument("path")
@click.argument("perms", nargs=-1)
@click.option("--json", "as_json", is_flag=True)
@_lab_cmd
def perms_cmd(ctx, path, perms, as_json, name, timeout):
    """Show PATH's permissions, or set them: PERMS like `n0 r5 b7`.

    The first entry names the owner and what every other domain may do;
    each further entry grants one domain (n none, r read, w write, b both)."""
    _paths([path])
    wanted = parse_perms(perms) if perms else None
    with _store(ctx, name, timeout) as store:
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
def watch_cmd(ctx, paths, count, duration, as_json, name, timeout):
    """Stream change events under each PATH until interrupted (Ctrl-C).

    xenstored fires one event per watched path as the watch is set up."""
    _paths(paths, watch=True)
    seen = 0
    start = time.time()
    deadline = time.monotonic() + duration if duration > 0 else None
    with _store(ctx, name, timeout) as store, store.watch(*paths) as watch:
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
@click.argument("path", default="/")
@click.option("--json", "as_json", is_flag=True, help="nested JSON: value, perms, children")
@_lab_cmd
def dump_cmd(ctx, path, as_json, name, timeout):
    """The whole tree under PATH with values and permissions."""
    from .cli import print_json
    from .xenstore.tree import dump, ls_lines

    _paths([path])
    with _store(ctx, name, timeout) as store:
        if as_json:
            print_json(dump(store, path))
        else:
            for line in ls_lines(store, path, full=True, perms=True):
                click.echo(line)


# -- trace ---------------------------------------------------------------------

@contextmanager
def traced(store: XenStore, guest: str | None, echo=None):
    """Record GUEST's XenBus state changes while the body runs (create,
    destroy, detach, ...). Yields the recorder; its timeline is complete
    after the block. For other commands that want a --trace option."""
    from .xenstore.recorder import XenBusRecorder
    from .xenstore.tracer import TimelineFormatter

    fmt = TimelineFormatter()

    def show(change):
        if echo is not None:
            echo(fmt.line(change))

    recorder = XenBusRecorder(store, guest, on_change=show)
    with recorder:
        yield recorder


def _settled(guest_devices_gone: bool):
    from .xenstore.tracer import CONNECTED

    def all_connected(timeline) -> bool:
        last = {}
        for c in timeline:
            if c.side != "domain":
                last[(c.domid, c.device, c.side)] = c.state
        return bool(last) and all(s == CONNECTED for s in last.values())

    def all_gone(timeline) -> bool:
        last = {}
        for c in timeline:
            if c.side != "domain":
                last[(c.domid, c.device, c.side)] = c.state
        return all(s is None for s in last.values())

    return all_gone if guest_devices_gone else all_connected


@click.command("trace")
@click.argument("guest")
@click.option("--lab", "lab_name", default=None, envvar="XENLAB_NAME", help="lab name (default: 'default')")
@click.option("--create", "do_create", is_flag=True, help="create GUEST (busybox root) and trace its devices coming up")
@click.option("--disk", "disks", multiple=True, metavar="SIZE[:ro]", help="with --create: a disk, repeatable (default one 16M disk)")
@click.option("--net/--no-net", default=True, help="with --create: a NIC (default on)")
@click.option("--root", default="busybox", show_default=True, help="with --create: the guest's root (busybox or python)")
@click.option("--destroy", "do_destroy", is_flag=True, help="destroy GUEST (xl destroy) and trace its devices going away")
@click.option("--for", "duration", type=float, default=0, help="without --create/--destroy: trace this many seconds (0: until Ctrl-C)")
@click.option("--settle", type=float, default=15, show_default=True, help="seconds to wait for the last state changes after the action")
@click.option("--json", "as_json", is_flag=True, help="timeline and per-device verdicts as JSON")
@_timeout_option
@click.pass_context
def trace(ctx, guest, lab_name, do_create, disks, net, root, do_destroy, duration, settle, as_json, timeout):
    """Trace GUEST's XenBus states: every change of each vbd/vif frontend and
    backend `state` node, timestamped, checked against the split-driver
    protocol (seed 003). Exits non-zero on a protocol violation."""
    from .cli import Lab, load_config, print_json
    from .xenstore.tracer import check, format_reports

    if do_create and do_destroy:
        raise XenlabError("--create and --destroy trace different things", "run `xenlab trace GUEST --create`, then `--destroy`")
    from .guest.manager import DiskSpec, Guests, GuestSpec

    lab = Lab(load_config(ctx, name=lab_name))
    echo = None if as_json else click.echo
    result = None
    spec = None
    if do_create:
        spec = GuestSpec(
            name=guest, memory=128 if root == "python" else 64, disks=tuple(DiskSpec.parse(d) for d in (disks or ("16M",))),
            net=net, root=root,
        ).validate()
    with _store(ctx, lab_name, timeout) as store, Guests(lab) as guests:
        if spec is not None:
            guests.prepare(spec)  # kernel and root built and shipped before the trace starts
        with traced(store, guest, echo=echo) as recorder:
            if do_create or do_destroy:
                result = guests.create(spec) if spec is not None else guests.destroy(guest)
                recorder.wait(_settled(do_destroy), settle)
            else:
                try:
                    if duration > 0:
                        time.sleep(duration)
                    else:
                        while True:
                            time.sleep(3600)
                except KeyboardInterrupt:
                    pass
        timeline = recorder.timeline
    reports = check(timeline)
    if as_json:
        print_json({
            "guest": guest, "action": "create" if do_create else "destroy" if do_destroy else "watch",
            "ok": all(r.ok for r in reports), "timeline": [c.to_dict() for c in timeline],
            "devices": [r.to_dict() for r in reports], "action_result": result,
        })
    else:
        if not timeline:
            click.echo(f"no XenBus device state of guest {guest!r} seen")
        click.echo("")
        for line in format_reports(reports):
            click.echo(line)
    bad = [f for r in reports for f in r.findings if f.level == "violation"]
    if bad:
        raise XenlabError(f"XenBus protocol violation: {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""),
                          "the timeline above shows the offending transition")


def register(main) -> None:
    main.add_command(xs)
    main.add_command(trace)
