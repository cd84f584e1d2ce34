"""Benchmark domUs: guest kernel build, create to Connected, destroy, block
dd MB/s in the domU against the same dd on a dom0 loop device (a ratio), and
network throughput over netfront/netback.

Prints one JSON document. Uses lab NAME (default "bench"), booting it if it
is down and stopping it afterwards only then. The kernel build figure comes
from the cached kernel's manifest unless --cold-kernel rebuilds it (~4 min).
Usage: .venv/bin/python bench/guest_bench.py [--name LAB] [--runs N] [--cold-kernel]"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lab_bench import host, summary, timed  # noqa: E402

GUEST = "bench-g"
DD_MIB = 32


def timed_dd(run, dd: str) -> float:
    """MB/s of one dd, timed by the machine that runs it (/proc/uptime, 10 ms
    resolution): busybox's dd prints no rate, and SSH time is not dd time."""
    out = run(f"a=$(cut -d' ' -f1 /proc/uptime); {dd} 2>/dev/null; b=$(cut -d' ' -f1 /proc/uptime); echo $a $b")
    a, b = map(float, out.split()[-2:])
    return round(DD_MIB * (1 << 20) / max(b - a, 0.01) / 1e6, 2)


def dd_pair(run, dev: str) -> dict:
    return {
        "write_mb_s": timed_dd(run, f"dd if=/dev/zero of={dev} bs=1M count={DD_MIB} oflag=direct"),
        "read_mb_s": timed_dd(run, f"dd if={dev} of=/dev/null bs=1M count={DD_MIB} iflag=direct"),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", default="bench")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cold-kernel", action="store_true")
    args = parser.parse_args()
    lab = ["--lab", args.name]
    booted = json.loads(timed("status", "--name", args.name, "--json")[1])["state"] != "up"
    if booted:
        timed("up", "--name", args.name)
    try:
        if args.cold_kernel:
            timed("guest", "build", "--force")
        kernel = json.loads(timed("guest", "build", "--json")[1])["kernel_build"]
        if GUEST in timed("guest", "list", *lab)[1]:
            timed("guest", "destroy", GUEST, *lab)
        # First create ships kernel and root to dom0; not counted.
        timed("guest", "create", GUEST, *lab, "--disk", f"{DD_MIB + 8}M", "--net")
        timed("guest", "destroy", GUEST, *lab)
        connected, create_cmd, xl_create, destroy_cmd, destroy_agent = [], [], [], [], []
        for _ in range(args.runs):
            took, out = timed("guest", "create", GUEST, *lab, "--disk", f"{DD_MIB + 8}M", "--net", "--json")
            info = json.loads(out)
            connected.append(info["timings"]["connected"])
            xl_create.append(info["timings"]["xl_create"])
            create_cmd.append(took)
            took, out = timed("guest", "destroy", GUEST, *lab, "--json")
            destroy_cmd.append(took)
            destroy_agent.append(json.loads(out)["seconds"])
        timed("guest", "create", GUEST, *lab, "--disk", f"{DD_MIB + 8}M", "--net")
        try:
            domu = dd_pair(lambda c: timed("guest", "exec", "--shell", *lab, GUEST, "--", c)[1], "/dev/xvda")
            dom0 = dd_pair(
                lambda c: timed("ssh", "--name", args.name, "--", f"f=/var/lib/xenlab/bench.img; truncate -s {DD_MIB + 8}M $f; "
                                f"d=$(losetup -f --show $f); {c.replace('DEV', '$d')}; losetup -d $d; rm -f $f")[1],
                "DEV",
            )
            checks = {r["check"]: r["data"] for r in json.loads(timed("guest", "check", GUEST, *lab, "--json")[1])}
        finally:
            timed("guest", "destroy", GUEST, *lab)
    finally:
        if booted:
            timed("down", "--name", args.name)
    print(json.dumps({
        "host": host(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "guest_kernel_release": kernel["release"],
        "guest_kernel_bzimage_bytes": Path(kernel["bzimage"]).stat().st_size,
        "create_to_connected_seconds": summary(connected),
        "xl_create_seconds": summary(xl_create),
        "create_command_seconds": summary(create_cmd),
        "destroy_seconds": summary(destroy_agent),
        "destroy_command_seconds": summary(destroy_cmd),
        "block_dd_mib": DD_MIB,
        "block_domu_blkfront": domu,
        "block_dom0_loop": dom0,
        "block_ratio_domu_over_dom0": {k: round(domu[k] / dom0[k], 3) for k in domu},
        "net_guest_to_dom0_mb_s": checks["net: bulk guest -> dom0"]["mb_s"],
        "net_dom0_to_guest_mb_s": checks["net: bulk dom0 -> guest"]["mb_s"],
    }, indent=2))


if __name__ == "__main__":
    main()
