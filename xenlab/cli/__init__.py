"""The xenlab command line. Only this package imports click, and nothing
imports it: each command parses, calls one library function and prints."""

from __future__ import annotations

import importlib
import logging
import signal
import sys
from pathlib import Path

# paramiko imports invoke (and with it asyncio and unittest.mock) only for
# ssh_config's `Match exec`, which xenlab never reads: 60 ms of every
# command's 300 ms start. This is the command's own process, so no one else
# is refused invoke.
sys.modules.setdefault("invoke", None)  # type: ignore[arg-type]  # None makes the import fail (documented); typeshed allows only modules

import click  # noqa: E402 - after the invoke stub above

from xenlab.cli.common import XenlabGroup  # noqa: E402 - after the invoke stub above

# Each command's module is imported only when that command runs (or for
# --help): `xenlab up` does not pay for the guest, verify and debug modules.
COMMANDS = {
    "config": ("lab", "config_cmd"), "doctor": ("lab", "doctor"), "build": ("lab", "build"), "up": ("lab", "up"),
    "reset": ("lab", "reset"), "down": ("lab", "down"), "snapshot": ("lab", "snapshot"), "status": ("lab", "status"),
    "ssh": ("lab", "ssh"), "cp": ("lab", "cp"), "console": ("lab", "console_cmd"),
    "dom0": ("dom0", "dom0"), "guest": ("guest", "guest"), "xs": ("xs", "xs"), "trace": ("xs", "trace"), "evtchn": ("evtchn", "evtchn"),
    "ring": ("evtchn", "ring"), "verify": ("verify", "verify"), "debug": ("debug", "debug"),
}
# Other names a command answers to, kept out of the command list (its help says them).
ALIASES = {"logs": "console"}


class LazyGroup(XenlabGroup):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        name = ALIASES.get(name, name)
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name]
        return getattr(importlib.import_module(f"xenlab.cli.{module}"), attr)


@click.group(cls=LazyGroup)
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

