"""The xenlab command line. Only this package imports click, and nothing
imports it: each command parses, calls one library function and prints."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import click

from xenlab.cli import debug, evtchn, guest, lab, verify, xs
from xenlab.cli.common import XenlabGroup


@click.group(cls=XenlabGroup)
@click.option("--config", "config_file", type=click.Path(path_type=Path), envvar="XENLAB_CONFIG",
              help="a TOML file over the defaults (`xenlab config` shows the result)")
@click.option("--debug", is_flag=True, help="log every command and show tracebacks")
@click.version_option(package_name="xenlab")
@click.pass_context
def main(ctx, config_file, debug):
    """A real nested Xen lab (Xen + Debian dom0 under QEMU/libvirt) for PV driver work."""
    ctx.obj = {"config": config_file, "debug": debug}
    # SIGTERM and SIGHUP as Ctrl-C: every command cleans up on KeyboardInterrupt
    # (an interrupted `up` destroys the VM it started, a create its guest).
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupted)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(name)s: %(message)s")


def _interrupted(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


for command in (lab.config_cmd, lab.doctor, lab.build, lab.up, lab.reset, lab.down, lab.snapshot, lab.status, lab.ssh, lab.cp, lab.console_cmd,
                guest.guest, xs.xs, xs.trace, evtchn.evtchn, evtchn.ring, verify.verify, debug.debug):
    main.add_command(command)
main.add_command(lab.console_cmd, "logs")
