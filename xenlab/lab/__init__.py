"""The lab VM: Xen and a Debian dom0 in one QEMU VM under libvirt (boot,
restore, state, SSH, accelerator choice, serial log). The handles to work in
it (Dom0, Guests) sit above it; xenlab.Lab (xenlab/api.py) joins them."""

from xenlab.lab.core import Lab
from xenlab.lab.state import list_labs

__all__ = ["Lab", "list_labs"]
