"""Compare the two QEMU stacks side by side in one run on one host: Debian
12's QEMU 7.2 and bookworm-backports' QEMU 10 (ci/qemu-backports.sh), both
under the same libvirt. Interleaved, per stack and run: a cold `up`
(snapshots off), what a dom0 process start costs (/bin/true, `xl list`,
timed by dom0's own clock), and a whole `xenlab verify` (its 18 checks on
the booted lab). Ratios are backports / stock (below 1: backports faster).

Prints one JSON document. Usage:
  .venv/bin/python bench/stack_bench.py [--runs 2] [--count 100]"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lab_bench import XENLAB, host, per_start_ms, summary, timed  # noqa: E402

from xenlab import Lab  # noqa: E402
from xenlab.lab.versions import qemu_version  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def stack_config(directory: str, name: str, qemu: str | None) -> str:
    path = os.path.join(directory, f"{name}.toml")
    with open(path, "w") as f:
        f.write("[lab]\nsnapshots = false\n" + (f'qemu = "{qemu}"\n' if qemu else ""))
    return path


def one_run(config: str, lab: str, count: int) -> dict:
    took, out = timed("--config", config, "up", "--lab", lab, "--cold", "--json")
    with Lab.open(lab, config=config).ssh() as ssh:
        def in_dom0(script: str) -> str:
            return ssh.check(script, timeout=600)

        true_ms = per_start_ms(in_dom0, "/bin/true", count)
        xl_ms = per_start_ms(in_dom0, "xl list", max(count // 10, 3))
    verify_s, _ = timed("--config", config, "verify", "--lab", lab)
    timed("down", "--lab", lab)
    return {"cold_up_s": took, "true_ms": true_ms, "xl_list_ms": xl_ms, "verify_s": verify_s}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--count", type=int, default=100)
    args = parser.parse_args()
    backports = subprocess.run(["bash", str(REPO / "ci/qemu-backports.sh")], capture_output=True, text=True, check=True).stdout.strip()
    stacks = {"stock": None, "backports": backports}
    results: dict[str, list[dict]] = {name: [] for name in stacks}
    with tempfile.TemporaryDirectory() as directory:
        configs = {name: stack_config(directory, name, qemu) for name, qemu in stacks.items()}
        labs = {name: f"stack-{name}"[:20] for name in stacks}
        try:
            for _ in range(args.runs):
                for name in stacks:  # interleaved: drift in the host's speed hits both
                    results[name].append(one_run(configs[name], labs[name], args.count))
        finally:
            for lab in labs.values():
                subprocess.run(XENLAB + ["down", "--lab", lab], capture_output=True)
    per_stack = {}
    for name, runs in results.items():
        per_stack[name] = {"qemu": qemu_version(stacks[name] or ""), **{k: summary([r[k] for r in runs]) for k in runs[0]}}
    ratio = {k: round(statistics.median(r[k] for r in results["backports"]) / statistics.median(r[k] for r in results["stock"]), 3)
             for k in results["stock"][0]}
    print(json.dumps({"benchmark": "stack", "host": host(), "runs": args.runs, "stacks": per_stack,
                      "ratio_backports_to_stock": ratio}, indent=2))


if __name__ == "__main__":
    main()
