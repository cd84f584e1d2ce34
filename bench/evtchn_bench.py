"""Event channel round trips in userspace, measured in dom0 (one JSON document):
- dom0 <-> domU: dom0 notifies, the domU's process answers, dom0 times it:
  placed (the default of `xenlab evtchn ping`: the timing vCPU, its port's
  interrupt and a physical CPU of their own, the domU on the other one),
  as the lab is (no pinning), and spinning (both sides poll, placed);
- dom0 <-> dom0: two handles in one process (the LAB-NOTES baseline, ~850 us).

Usage: .venv/bin/python bench/evtchn_bench.py [--name LAB] [--guest NAME] [--count N] [--runs R]
Boots the lab and creates a python domU when they are not there (and removes them after)."""

from __future__ import annotations

import argparse
import statistics
import time

from ring_bench import emit, host, lab_and_guest  # shared helpers (lab up, python domU)

from xenlab.guest.agentrun import agent
from xenlab.evtchn.ping import ping


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="bench")
    ap.add_argument("--guest", default=None)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    doc = {"bench": "evtchn", "date": time.strftime("%Y-%m-%d"), "host": host(), "count_per_run": args.count, "runs": {}}
    with lab_and_guest(args.name, args.guest) as (lab, guest, where):
        doc.update(where)
        modes = {"dom0_domU_placed": lambda: ping(lab, guest, args.count),
                 "dom0_domU_as_is": lambda: ping(lab, guest, args.count, place=False),
                 "dom0_domU_spinning_placed": lambda: ping(lab, guest, args.count, spin=True)}
        with lab.ssh() as ssh:
            modes["dom0_dom0_two_handles"] = lambda: agent(ssh, "evtchn", "local-ping", "--count", str(args.count))
            for mode, run in modes.items():
                doc["runs"][mode] = [run() for _ in range(args.runs)]
    doc["summary_us"] = {
        mode: {k: round(statistics.median(r[k] for r in runs), 1)
               for k in ("mean_us", "p50_us", "p90_us", "p99_us", "min_us", "overall_mean_us") if k in runs[0]}
        for mode, runs in doc["runs"].items()
    }
    doc["goal"] = "dom0<->domU round trip <= 300 us"
    placed = doc["summary_us"]["dom0_domU_placed"]
    doc["goal_met"] = {"median_of_run_means": placed["mean_us"] <= 300, "median_of_run_p50s": placed["p50_us"] <= 300}
    emit(doc)


if __name__ == "__main__":
    main()
