"""ci/test.sh's ledger: its time per phase and the share of CI's 90-minute
limit the whole run used, printed and kept as JSON (docs/testing.md#the-ledger).

    python3 ci/ledger.py LINES JSON --started EPOCH --mode TEXT

LINES holds one phase per line: name, seconds, exit code (tab-separated);
phases run beside each other each count their own time, so their sum can
exceed the wall time."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

CI_LIMIT_SECONDS = 90 * 60
GOAL_SHARE = 1 / 3  # the gate and one slice: a third of the limit, so a host 2.5x slower still lands


def read_phases(path: Path) -> list[dict]:
    phases = []
    for line in path.read_text().splitlines() if path.exists() else []:
        name, seconds, code = line.split("\t")
        phases.append({"name": name, "seconds": int(seconds), "exit_code": int(code)})
    return phases


def commit() -> str | None:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("lines", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--started", type=int, required=True)
    parser.add_argument("--mode", required=True)
    args = parser.parse_args()
    phases = read_phases(args.lines)
    wall = int(time.time()) - args.started
    ledger = {
        "mode": args.mode,
        "commit": commit(),
        "host": os.uname().nodename,
        "cpus": os.cpu_count(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(args.started)),
        "phases": phases,
        "wall_seconds": wall,
        "limit_seconds": CI_LIMIT_SECONDS,
        "share_of_limit": round(wall / CI_LIMIT_SECONDS, 3),
        "ok": all(p["exit_code"] == 0 for p in phases),
    }
    args.out.write_text(json.dumps(ledger, indent=2) + "\n")
    print(f"--- ledger ({args.out}): {args.mode}")
    for p in phases:
        mark = "" if p["exit_code"] == 0 else f"  (exit {p['exit_code']})"
        print(f"  {p['name']:<24} {p['seconds'] // 60:3d} min {p['seconds'] % 60:02d} s{mark}")
    print(f"  {'wall time':<24} {wall // 60:3d} min {wall % 60:02d} s: {ledger['share_of_limit']:.0%} of CI's 90-min limit"
          f" (the gate and one slice should stay under {GOAL_SHARE:.0%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
