"""The lab: Xen and a Debian dom0 in one QEMU VM under libvirt (boot, state,
SSH, accelerator choice, serial log), and the Dom0 handle."""

from xenlab.lab.core import Lab, list_labs
from xenlab.lab.dom0 import Dom0

__all__ = ["Dom0", "Lab", "list_labs"]
