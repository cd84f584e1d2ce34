"""xenlab: a real nested Xen lab under QEMU/libvirt for testing PV drivers."""

__version__ = "0.1.0"
