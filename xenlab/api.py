"""xenlab.Lab: the lab VM (xenlab.lab.Lab) with the handles to work in it.

The lab package knows the VM only; the handles sit above it (Guests on the
lab's SSH, Dom0 on SSH and XenStore). This class joins them for users, the
pytest plugin, verify and the CLI, so that no lower package reaches up:

    lab = Lab.open("mylab")
    lab.ensure_up()
    with lab.dom0() as dom0, lab.guests() as guests:
        ...
"""

from __future__ import annotations

from xenlab.dom0 import Dom0
from xenlab.guest.manager import Guests
from xenlab.lab import core


class Lab(core.Lab):
    """A lab (see xenlab.lab.Lab: open, ensure_up, up, reset, down, status,
    ssh) with dom0() and guests()."""

    def dom0(self) -> Dom0:
        """A Dom0 handle: run, check, put, get and XenStore (close it when done)."""
        return Dom0(self)

    def guests(self) -> Guests:
        """The Guests manager of this lab (create, list, exec, destroy; close it when done)."""
        return Guests(self)
