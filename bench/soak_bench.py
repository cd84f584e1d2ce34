"""Soak: many guest create/destroy cycles and lab up/reset/down cycles, with what
could leak counted before and after. In dom0: Xen's free memory, loop
devices, vifs, backend nodes in XenStore, active grant entries; on the
host: QEMU processes, this process's open files and threads. Every count
must come back to where it started ("leaks" lists the ones that did not).

Prints one JSON document. Uses lab NAME (default "soak"), booted here and
stopped at the end. Usage:
  .venv/bin/python bench/soak_bench.py [--name LAB] [--guests 50] [--labs 10]"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lab_bench import host, summary  # noqa: E402

from xenlab.agent.xl import parse_xl_info  # noqa: E402
from xenlab.guest.spec import DiskSpec, GuestSpec  # noqa: E402
from xenlab import Lab  # noqa: E402
from xenlab.progress import Steps  # noqa: E402

GUEST = "soak-g"
DOM0_COUNTS = (
    "xl info | grep '^free_memory'; echo @@; losetup -a | wc -l; echo @@; ls /sys/class/net | grep -c '^vif' || true; echo @@; "
    "xenstore-ls -f /local/domain/0/backend 2>/dev/null | wc -l; echo @@; "
    # Active grant entries of all domains, from Xen's own table dump (debug key g).
    "xl debug-keys g; xl dmesg | tail -n 3000 | awk '/gnttab_usage_print_all/{n=0} /\\] \\[0x/{n++} END{print n+0}'"
)


def dom0_counts(lab: Lab) -> dict:
    with lab.ssh() as ssh:
        parts = ssh.check(DOM0_COUNTS, timeout=120).split("@@\n")
    return {"xen_free_mib": int(parse_xl_info(parts[0])["free_memory"]), "loop_devices": int(parts[1]), "vifs": int(parts[2]),
            "backend_nodes": int(parts[3]), "grant_entries_active": int(parts[4].split()[-1])}


def host_counts() -> dict:
    qemus = sum(1 for p in Path("/proc").iterdir() if p.name.isdigit() and _comm(p) == "qemu-system-x86")
    return {"qemu_processes": qemus, "open_files": len(os.listdir("/proc/self/fd")), "threads": threading.active_count()}


def _comm(proc: Path) -> str:
    try:
        return (proc / "comm").read_text().strip()
    except OSError:
        return ""


def leaks(before: dict, after: dict) -> dict:
    return {k: (before[k], after[k]) for k in before if after[k] != before[k]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", default="soak")
    parser.add_argument("--guests", type=int, default=50)
    parser.add_argument("--labs", type=int, default=10)
    args = parser.parse_args()
    lab = Lab.open(args.name)
    lab.down()
    lab.up(Steps(quiet=True))
    spec = GuestSpec(name=GUEST, disks=(DiskSpec(16),), net=True)
    create_s, destroy_s = [], []
    with lab.guests() as guests:
        guests.prepare(spec)  # kernel and root shipped once, outside the cycles
        dom0_before = dom0_counts(lab)
        for _ in range(args.guests):
            t = time.monotonic()
            guests.create(spec)
            create_s.append(time.monotonic() - t)
            t = time.monotonic()
            guests.destroy(GUEST)
            destroy_s.append(time.monotonic() - t)
    time.sleep(3)  # Xen returns a destroyed domain's memory a moment after `xl destroy` returns
    dom0_after = dom0_counts(lab)
    lab.down()
    # Counted after one whole up/down: libvirt opens its event loop's
    # descriptors once per process, on first use, and keeps them.
    host_before = host_counts()
    up_s, reset_s, down_s = [], [], []
    for _ in range(args.labs):
        t = time.monotonic()
        lab.up(Steps(quiet=True))
        up_s.append(time.monotonic() - t)
        t = time.monotonic()
        lab.reset(Steps(quiet=True))
        reset_s.append(time.monotonic() - t)
        t = time.monotonic()
        lab.down()
        down_s.append(time.monotonic() - t)
    host_after = host_counts()
    report = {
        "host": host(), "lab": args.name, "guest_cycles": args.guests, "lab_cycles": args.labs,
        "guest_create_s": summary(create_s), "guest_destroy_s": summary(destroy_s), "lab_up_s": summary(up_s), "lab_reset_s": summary(reset_s), "lab_down_s": summary(down_s),
        "dom0_before": dom0_before, "dom0_after": dom0_after, "host_before": host_before, "host_after": host_after,
        "leaks": {**leaks(dom0_before, dom0_after), **leaks(host_before, host_after)},
    }
    print(json.dumps(report, indent=2))
    sys.exit(1 if report["leaks"] else 0)


if __name__ == "__main__":
    main()
