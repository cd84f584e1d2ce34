"""Benchmark the foundation: cold image build, warm `up` to ready, `down`.

Prints one JSON document. `--cold` rebuilds the dom0 image (about 80 s);
without it the cold figure comes from the cached image's manifest.
Usage: .venv/bin/python bench/lab_bench.py [--runs N] [--cold]"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

XENLAB = [sys.executable, "-m", "xenlab"]
NAME = "bench"


def timed(*args: str) -> tuple[float, str]:
    start = time.monotonic()
    proc = subprocess.run(XENLAB + list(args), capture_output=True, text=True)
    took = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"xenlab {' '.join(args)} failed:\n{proc.stderr}")
    return took, proc.stdout


def host() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next(int(l.split()[1]) // 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal"))
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_mib": mem, "kernel": platform.release(), "qemu": qemu}


def summary(values: list[float]) -> dict:
    return {"min": round(min(values), 2), "median": round(statistics.median(values), 2), "max": round(max(values), 2), "runs": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="rebuild the dom0 image and time it")
    args = parser.parse_args()
    if args.cold:
        cold, out = timed("build", "--force", "--json")
        build = {"seconds": round(cold, 1), "measured": "now"}
    else:
        _, out = timed("build", "--json")
        build = {"seconds": json.loads(out)["build_seconds"], "measured": "cached image manifest"}
    ups, boots, downs, accel = [], [], [], None
    subprocess.run(XENLAB + ["down", "--name", NAME], capture_output=True)
    for _ in range(args.runs):
        took, out = timed("up", "--name", NAME, "--json")
        info = json.loads(out)
        ups.append(took)
        boots.append(info["boot_seconds"])
        accel = info["accel"]
        took, _ = timed("down", "--name", NAME)
        downs.append(took)
    print(json.dumps({
        "benchmark": "lab",
        "host": host(),
        "accel": accel,
        "cold_build_seconds": build,
        "warm_up_to_ready_seconds": summary(ups),
        "domain_start_to_ready_seconds": summary(boots),
        "down_seconds": summary(downs),
        "target_warm_up_seconds": 15,
    }, indent=2))


if __name__ == "__main__":
    main()
