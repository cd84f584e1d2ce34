"""Device channel throughput (frontend in a domU, backend in dom0): requests
per second and MB/s (payload bytes moved, both directions counted) for
several payload sizes and operations. One JSON document.

Placed like `xenlab ring bench` (the backend's vCPU alone on a physical CPU)
unless --no-placement.

Usage: .venv/bin/python bench/ring_bench.py [--name LAB] [--guest NAME] [--count N] [--runs R] [--no-placement]"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager

from xenlab import config
from xenlab.evtchn.devchan import devchan
from xenlab.guest.manager import Guests
from xenlab.guest.spec import GuestSpec
from xenlab import Lab

XENLAB = [sys.executable, "-m", "xenlab"]


def host() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    load = os.getloadavg()[0]
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "loadavg_1m_at_start": round(load, 2)}


@contextmanager
def lab_and_guest(name: str, guest: str | None):
    lab = Lab(config.load(overrides={"name": name}))
    booted = lab.info() is None
    if booted:
        subprocess.run(XENLAB + ["up", "--name", name, "--json"], check=True, capture_output=True)
    made = guest is None
    guest = guest or "bench-peer"
    try:
        if made:
            with Guests(lab) as guests:
                guests.create(GuestSpec(name=guest, root="python"))
        try:
            yield lab, guest, {"lab": name, "accel": lab.info()["accel"], "guest": guest}
        finally:
            if made:
                with Guests(lab) as guests:
                    guests.destroy(guest)
    finally:
        if booted:
            subprocess.run(XENLAB + ["down", "--name", name], capture_output=True)


def emit(doc: dict) -> None:
    print(json.dumps(doc, indent=2))

CASES = [("nop", 0), ("echo", 512), ("echo", 2048), ("echo", 4096), ("write", 4096), ("read", 4096)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="bench")
    ap.add_argument("--guest", default=None)
    ap.add_argument("--count", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-placement", dest="place", action="store_false", help="measure the lab as it is (no pinning)")
    args = ap.parse_args()
    doc = {"bench": "ring", "date": time.strftime("%Y-%m-%d"), "host": host(), "requests_per_run": args.count,
           "placement": args.place, "cases": []}
    with lab_and_guest(args.name, args.guest) as (lab, guest, where):
        doc.update(where)
        for op, size in CASES:
            runs = []
            for _ in range(args.runs):
                f = devchan(lab, guest, f"--count {args.count} --size {size} --op {op}", devid=20, place=args.place)["frontend"]
                runs.append({k: f[k] for k in ("requests_per_s", "mb_per_s", "seconds", "notifies_sent", "ring_full_seen")})
            doc["cases"].append({
                "op": op, "size": size, "runs": runs,
                "requests_per_s_median": round(statistics.median(r["requests_per_s"] for r in runs), 1),
                "mb_per_s_median": round(statistics.median(r["mb_per_s"] for r in runs), 2),
            })
    emit(doc)


if __name__ == "__main__":
    main()
