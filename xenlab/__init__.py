"""xenlab: a real nested Xen lab under QEMU/libvirt for testing PV drivers.

The handles for plain Python (imported on first use, so `import xenlab` is cheap):

    from xenlab import DiskSpec, GuestSpec, Lab

    lab = Lab.open("mylab")            # configuration: defaults, a TOML file, overrides
    lab.ensure_up()                    # boots Xen + dom0 unless already up
    with lab.dom0() as dom0:           # Dom0: run, check, put, get, xs
        print(dom0.check("xl info"))
    with lab.guests() as guests:       # Guests: start, get, list, exec, destroy
        guest = guests.start(GuestSpec(name="g1", disks=(DiskSpec(64),), net=True))
        print(guest.exec("cat /proc/partitions").stdout)   # Guest: exec, put, get, console, check
        guest.destroy()

Errors are xenlab.errors.XenlabError and its subclasses (message + hint)."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:  # the names below, for editors and type checkers (imported lazily at run time)
    from xenlab.api import Lab
    from xenlab.config import LabConfig
    from xenlab.config import load as load_config
    from xenlab.dom0 import Dom0
    from xenlab.errors import XenlabError
    from xenlab.guest.handle import AttachedDisk, Guest
    from xenlab.guest.manager import Guests
    from xenlab.guest.spec import DiskSpec, GuestSpec
    from xenlab.xenstore.client import XenStore

_PUBLIC = {
    "Lab": "xenlab.api",
    "Dom0": "xenlab.dom0",
    "Guest": "xenlab.guest.handle",
    "AttachedDisk": "xenlab.guest.handle",
    "Guests": "xenlab.guest.manager",
    "GuestSpec": "xenlab.guest.spec",
    "DiskSpec": "xenlab.guest.spec",
    "LabConfig": "xenlab.config",
    "load_config": "xenlab.config",
    "XenStore": "xenlab.xenstore.client",
    "XenlabError": "xenlab.errors",
}
# Written out (not sorted(_PUBLIC)) so that linters and type checkers see the
# names exported; tests/unit/test_layering.py checks the two agree.
__all__ = [
    "AttachedDisk", "DiskSpec", "Dom0", "Guest", "GuestSpec", "Guests", "Lab", "LabConfig", "XenStore", "XenlabError", "load_config",
]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'xenlab' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(_PUBLIC[name])
    return getattr(module, "load" if name == "load_config" else name)
