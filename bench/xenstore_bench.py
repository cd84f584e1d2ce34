#!/usr/bin/env python3
"""XenStore from the host (pyxs over SSH) against the same operations run in
dom0 with xenstore-read / xenstore-write. Prints JSON.

    .venv/bin/python bench/xenstore_bench.py --name xs --count 200

Figures: read latency (sequential, each waits for its reply) and writes per
second (sequential, and pipelined with 16 in flight) from the host; the
same reads and writes done in dom0 by the xenstore-* tools (one process per
operation, as scripts use them), timed inside dom0; the ratios; and the
plain SSH channel round trip the host figures ride on."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

from xenlab.config import load
from xenlab import Lab
from xenlab.xenstore.client import XenStore

NODE = "/xenlab-bench"


def summary(samples_s: list[float]) -> dict:
    ms = sorted(s * 1000 for s in samples_s)
    return {
        "n": len(ms), "mean_ms": round(statistics.mean(ms), 3), "median_ms": round(statistics.median(ms), 3),
        "p95_ms": round(ms[int(len(ms) * 0.95) - 1], 3), "min_ms": round(ms[0], 3), "max_ms": round(ms[-1], 3),
    }


def host_figures(xs: XenStore, count: int) -> dict:
    xs.write(f"{NODE}/r", "value")
    for _ in range(5):
        xs.read(f"{NODE}/r")  # warm up
    reads = []
    for _ in range(count):
        t = time.perf_counter()
        xs.read(f"{NODE}/r")
        reads.append(time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(count):
        xs.write(f"{NODE}/w", str(i))
    seq_writes = time.perf_counter() - t
    t = time.perf_counter()
    xs.batch([("write", f"{NODE}/p", str(i)) for i in range(count)])
    piped = time.perf_counter() - t
    assert xs.read(f"{NODE}/p") == str(count - 1)
    return {
        "read": summary(reads),
        "writes_per_second_sequential": round(count / seq_writes, 1),
        "writes_per_second_pipelined": round(count / piped, 1),
    }


def dom0_figures(ssh, count: int) -> dict:
    script = f"""
xenstore-write {NODE}/r value
s=$(date +%s%N); i=0; while [ $i -lt {count} ]; do xenstore-read {NODE}/r >/dev/null; i=$((i+1)); done; e=$(date +%s%N)
echo read $(( (e - s) / 1000 ))
s=$(date +%s%N); i=0; while [ $i -lt {count} ]; do xenstore-write {NODE}/w $i; i=$((i+1)); done; e=$(date +%s%N)
echo write $(( (e - s) / 1000 ))
s=$(date +%s%N); i=0; while [ $i -lt {count} ]; do /bin/true; i=$((i+1)); done; e=$(date +%s%N)
echo spawn $(( (e - s) / 1000 ))
"""
    out = dict(line.split() for line in ssh.check(script, timeout=1800).split("\n") if line.strip())
    read_us, write_us, spawn_us = (int(out[k]) for k in ("read", "write", "spawn"))
    return {
        "read_mean_ms": round(read_us / count / 1000, 3),
        "writes_per_second": round(count / (write_us / 1e6), 1),
        "process_spawn_mean_ms": round(spawn_us / count / 1000, 3),
    }


def ssh_rtt(ssh, count: int) -> dict:
    chan = ssh.transport().open_session()
    chan.exec_command("cat")
    samples = []
    for _ in range(count):
        t = time.perf_counter()
        chan.sendall(b"x" * 32)
        got = 0
        while got < 32:
            got += len(chan.recv(64))
        samples.append(time.perf_counter() - t)
    chan.close()
    return summary(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="default", help="lab name (must be up)")
    parser.add_argument("--count", type=int, default=200, help="operations per figure")
    args = parser.parse_args()
    lab = Lab(load(None, {"name": args.name}))
    info = lab.require_up()
    with XenStore.for_lab(lab, timeout=30) as xs, lab.ssh() as ssh:
        try:
            host = host_figures(xs, args.count)
            dom0 = dom0_figures(ssh, args.count)
            rtt = ssh_rtt(ssh, min(args.count, 100))
        finally:
            xs.rm(NODE)
    result = {
        "benchmark": "xenstore", "date": time.strftime("%Y-%m-%d"), "host": platform.node(), "accel": info["accel"],
        "count": args.count,
        "host_via_ssh": host,
        "dom0_tools": dom0,
        "ssh_channel_round_trip": rtt,
        "ratios": {
            "read_latency_host_over_dom0": round(host["read"]["mean_ms"] / dom0["read_mean_ms"], 3),
            "writes_per_second_host_sequential_over_dom0": round(host["writes_per_second_sequential"] / dom0["writes_per_second"], 3),
            "writes_per_second_host_pipelined_over_dom0": round(host["writes_per_second_pipelined"] / dom0["writes_per_second"], 3),
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
