"""What a process start costs under TCG, by the shape of the lab and the
guest type, side by side in one run on one host:

- dom0 on a lab of 2 vCPUs with dom0 on 2 (the default), on 2 with dom0 on 1,
  and on 1 with dom0 on 1: a fork+exec of /bin/true, `xl list`,
  `xenstore-read`, each timed by dom0's clock over a loop;
- on a 1-vCPU Xen 4.20 lab (PVH needs both under TCG, docs/guest-types.md):
  /bin/true in a PV and in a PVH domU running the same Debian kernel;
- /bin/true on the host.

The question it answers: would a PVH dom0, or fewer vCPUs, make dom0's
process starts cheaper (docs/performance.md#dom0-process-starts).
Prints one JSON document. Uses lab NAME (default "bench-starts"), stopped
at the end. Usage: .venv/bin/python bench/process_start_bench.py [--count N]"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lab_bench import host, on_host, per_start_ms  # noqa: E402

from xenlab import GuestSpec, Lab  # noqa: E402
from xenlab.progress import Steps  # noqa: E402

SHAPES = (("lab 2 vCPUs, dom0 2", 2, 2), ("lab 2 vCPUs, dom0 1", 2, 1), ("lab 1 vCPU, dom0 1", 1, 1))


def uptime_loop(count: int) -> str:
    """A shell loop timed by /proc/uptime (busybox's date has no nanoseconds); prints seconds."""
    return (f"a=$(cut -d' ' -f1 /proc/uptime); i=0; while [ $i -lt {count} ]; do /bin/true; i=$((i+1)); done; "
            "b=$(cut -d' ' -f1 /proc/uptime); echo $a $b")


def dom0_costs(name: str, vcpus: int, dom0_vcpus: int, count: int) -> dict:
    lab = Lab.open(name, vcpus=vcpus, **{"dom0.vcpus": dom0_vcpus})
    lab.up(Steps(quiet=True))
    try:
        with lab.ssh() as ssh:
            def in_dom0(script: str) -> str:
                return ssh.check(script, timeout=600)

            return {
                "true_ms": round(per_start_ms(in_dom0, "/bin/true", count), 2),
                "xl_list_ms": round(per_start_ms(in_dom0, "xl list", max(count // 10, 3)), 2),
                "xenstore_read_ms": round(per_start_ms(in_dom0, "xenstore-read domid", max(count // 5, 3)), 2),
            }
    finally:
        lab.down()


def domu_costs(name: str, count: int) -> dict:
    lab = Lab.open(name, vcpus=1, **{"dom0.vcpus": 1, "dom0.suite": "trixie"})
    lab.up(Steps(quiet=True))
    try:
        result = {}
        with lab.guests() as guests:
            for guest_type in ("pv", "pvh"):
                guest = guests.start(GuestSpec(name=f"starts-{guest_type}", kernel="debian", memory=256, type=guest_type))
                try:
                    guest.exec(uptime_loop(10))  # the first run pages /bin/true in
                    a, b = map(float, guest.exec(uptime_loop(count)).stdout.split())
                    result[f"{guest_type}_domu_true_ms"] = round((b - a) * 1000 / count, 2)
                finally:
                    guest.destroy()
        return result
    finally:
        lab.down()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", default="bench-starts")
    parser.add_argument("--count", type=int, default=200, help="/bin/true starts per loop")
    args = parser.parse_args()
    dom0 = {label: dom0_costs(args.name, vcpus, dom0_vcpus, args.count) for label, vcpus, dom0_vcpus in SHAPES}
    domu = domu_costs(args.name, args.count)
    host_true = per_start_ms(on_host, "/bin/true", args.count * 10)
    default = dom0[SHAPES[0][0]]["true_ms"]
    print(json.dumps({
        "benchmark": "process_starts",
        "host": host(),
        "count": args.count,
        "dom0": dom0,
        "domu_xen_4_20_lab_1_vcpu": domu,
        "host_true_ms": round(host_true, 3),
        "ratio_dom0_true_to_host": {label: round(v["true_ms"] / host_true, 1) for label, v in dom0.items()},
        "ratio_dom0_1_vcpu_to_default": round(dom0[SHAPES[2][0]]["true_ms"] / default, 2),
        "ratio_pvh_domu_to_pv_domu": round(domu["pvh_domu_true_ms"] / domu["pv_domu_true_ms"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
