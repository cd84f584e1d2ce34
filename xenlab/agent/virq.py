"""Xen's virtual IRQ numbers, by name and back."""

# Virtual IRQ numbers (xen/include/public/xen.h).
VIRQS = {
    "timer": 0, "debug": 1, "console": 2, "dom_exc": 3, "tbuf": 4, "debugger": 6, "xenoprof": 7,
    "con_ring": 8, "pcpu_state": 9, "mem_event": 10, "argo": 11, "enomem": 12, "xenpmu": 13,
}
VIRQ_NAMES = {v: k for k, v in VIRQS.items()}
