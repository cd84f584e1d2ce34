"""Benchmark the lab itself, side by side in one run on one host:

- `up` booting cold (snapshots off), `up` restoring the snapshot, `reset`
  and `down`, interleaved run by run; ratios restore/cold and reset/cold;
- what a process start costs in dom0 against the host: a fork+exec of
  /bin/true, `xl list`, `xenstore-read`, `python3 -c pass` (each timed by
  dom0's own clock over a loop), and an SSH connection plus its first command.

Prints one JSON document. `--build` also rebuilds the dom0 image (about 80 s: docs/performance.md).
Usage: .venv/bin/python bench/lab_bench.py [--runs N] [--build] [--suite trixie]"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

XENLAB = [sys.executable, "-m", "xenlab"]
NAME = "bench"
SUITE_CONFIG: list[str] = []  # ["--config", FILE] naming the dom0 suite, when not the default


def timed(*args: str) -> tuple[float, str]:
    start = time.monotonic()
    if args[0] != "--config":
        args = (*SUITE_CONFIG, *args)
    proc = subprocess.run(XENLAB + list(args), capture_output=True, text=True)
    took = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"xenlab {' '.join(args)} failed:\n{proc.stderr}")
    return took, proc.stdout


def host() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next(int(l.split()[1]) // 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal"))
    from xenlab.lab.versions import qemu_binary  # the QEMU labs run by default, not just the one on PATH

    qemu = subprocess.run([qemu_binary(), "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_mib": mem, "kernel": platform.release(), "qemu": qemu}


def summary(values: list[float]) -> dict:
    return {"min": round(min(values), 2), "median": round(statistics.median(values), 2), "max": round(max(values), 2), "runs": len(values)}


def per_start_ms(run, command: str, count: int) -> float:
    """Milliseconds per run of `command`, from a loop timed by the clock of where it runs."""
    script = f'a=$(date +%s%N); i=0; while [ $i -lt {count} ]; do {command} >/dev/null 2>&1; i=$((i+1)); done; b=$(date +%s%N); echo $((b-a))'
    return int(run(script).strip()) / count / 1e6


def on_host(script: str) -> str:
    """What `script` prints, run by sh on this host (per_start_ms's `run` for the host's figures)."""
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout


def process_costs(count: int) -> dict:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from xenlab import Lab

    lab = Lab.open(NAME)  # a running lab: its suite is the one it was started with

    connects = []
    for _ in range(5):
        start = time.monotonic()
        with lab.ssh() as ssh:
            ssh.check("true")
        connects.append(time.monotonic() - start)
    with lab.ssh() as ssh:
        def in_dom0(script: str) -> str:
            return ssh.check(script, timeout=600)

        dom0 = {
            "true": per_start_ms(in_dom0, "/bin/true", count),
            "xl_list": per_start_ms(in_dom0, "xl list", max(count // 10, 3)),
            "xenstore_read": per_start_ms(in_dom0, "xenstore-read domid", max(count // 5, 3)),
            "python3": per_start_ms(in_dom0, "python3 -c pass", max(count // 20, 3)),
        }
    host_ms = {"true": per_start_ms(on_host, "/bin/true", count * 10), "python3": per_start_ms(on_host, f"{sys.executable} -I -c pass", count)}
    return {
        "dom0_ms": {k: round(v, 2) for k, v in dom0.items()},
        "host_ms": {k: round(v, 3) for k, v in host_ms.items()},
        "ratio_dom0_true_to_host_true": round(dom0["true"] / host_ms["true"], 1),
        "ratio_dom0_xl_list_to_host_true": round(dom0["xl_list"] / host_ms["true"], 1),
        "ssh_connect_and_first_command_seconds": summary(connects),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--count", type=int, default=100, help="/bin/true starts per loop (fewer of the slower commands)")
    parser.add_argument("--build", action="store_true", help="rebuild the dom0 image and time it")
    parser.add_argument("--suite", default="", help="the dom0 suite (default: the configured one, bookworm)")
    args = parser.parse_args()
    suite_lines = f'[dom0]\nsuite = "{args.suite}"\n' if args.suite else ""
    if suite_lines:
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write(suite_lines)
        SUITE_CONFIG.extend(["--config", f.name])
    if args.build:
        took, out = timed("build", "--force", "--json")
        build = {"seconds": round(took, 1), "measured": "now"}
    else:
        _, out = timed("build", "--json")
        build = {"seconds": json.loads(out)["build_seconds"], "measured": "cached image manifest"}
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write("[lab]\nsnapshots = false\n" + suite_lines)
        no_snapshots = f.name
    colds, restores, resets, downs, accel = [], [], [], [], None
    subprocess.run(XENLAB + ["down", "--lab", NAME], capture_output=True)
    try:
        timed("up", "--lab", NAME, "--cold")  # makes sure this configuration has its snapshot
        timed("down", "--lab", NAME)
        for _ in range(args.runs):
            took, out = timed("--config", no_snapshots, "up", "--lab", NAME, "--json")
            colds.append(took)
            accel = json.loads(out)["accel"]
            timed("down", "--lab", NAME)
            took, out = timed("up", "--lab", NAME, "--json")
            if not json.loads(out)["restored"]:
                sys.exit("`up` did not restore the snapshot")
            restores.append(took)
            took, out = timed("reset", "--lab", NAME, "--json")
            if not json.loads(out)["restored"]:
                sys.exit("`reset` did not restore the snapshot")
            resets.append(took)
            took, _ = timed("down", "--lab", NAME)
            downs.append(took)
        timed("up", "--lab", NAME)
        costs = process_costs(args.count)
    finally:
        subprocess.run(XENLAB + ["down", "--lab", NAME], capture_output=True)
        os.unlink(no_snapshots)
        if SUITE_CONFIG:
            os.unlink(SUITE_CONFIG[1])
    cold = statistics.median(colds)
    print(json.dumps({
        "benchmark": "lab",
        "host": host(),
        "accel": accel,
        "suite": args.suite or "bookworm",
        "dom0_image_build_seconds": build,
        "cold_up_seconds": summary(colds),
        "restore_up_seconds": summary(restores),
        "reset_seconds": summary(resets),
        "down_seconds": summary(downs),
        "ratio_restore_to_cold": round(statistics.median(restores) / cold, 3),
        "ratio_reset_to_cold": round(statistics.median(resets) / cold, 3),
        "target_ratio": 0.2,
        "process_starts": costs,
    }, indent=2))


if __name__ == "__main__":
    main()
