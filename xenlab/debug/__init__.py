"""Debugging a dom0/domU pair: gdb on the lab VM, guest stacks (xenctx),
guest cores, Xen's debug keys and symbol tables for all of them."""
