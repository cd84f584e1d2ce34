"""The support matrix of docs/hardening.md: every standard fault plan
(xenlab.guest.hardening.STANDARD_PLANS) against the stock blkfront of each
guest kernel, a fresh guest per plan, with what the frontend did.

Prints one JSON document (rows, plus the table as Markdown). Usage:
  .venv/bin/python bench/hardening_matrix.py [--kernels minimal,debian] [--lab bench-hardening]"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from lab_bench import host  # noqa: E402

from xenlab import GuestSpec, Lab  # noqa: E402
from xenlab.agent.faultplan import FAULTS  # noqa: E402
from xenlab.guest.hardening import STANDARD_PLANS, probe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kernels", default="minimal,debian")
    parser.add_argument("--lab", default="bench-hardening")
    parser.add_argument("--plans", default="", help="comma-separated subset of the standard plans (by fault name)")
    args = parser.parse_args()
    kernels = args.kernels.split(",")
    plans = [p for p in STANDARD_PLANS if not args.plans or p.split(":")[0] in args.plans.split(",")]
    lab = Lab.open(args.lab)
    lab.ensure_up()
    booted = lab.booted
    rows = []
    try:
        with lab.guests() as guests:
            for kernel in kernels:
                release = ""
                for n, plan in enumerate(plans):
                    name = f"hm-{kernel[:4]}-{n}"
                    guest = guests.start(GuestSpec(name=name, kernel=kernel))
                    try:
                        release = release or guest.exec("uname -r").stdout.strip()
                        result = probe(guest, plan)
                    finally:
                        guests.destroy(name)
                    rows.append({"kernel": kernel, "release": release, "plan": plan, "outcome": result["outcome"],
                                 "faults_fired": result["backend"].get("faults_fired"), "survived": result["guest_alive"] and not result["guest_trouble"],
                                 "kernel_log": [l for l in result["io"]["kernel_log"] if "xvd" in l][:4]})
                    print(f"{kernel} {plan}: {result['outcome']}", file=sys.stderr)
    finally:
        if booted:
            lab.down()
    header = "| fault (plan) | what a hardened frontend must do | " + " | ".join(
        f"{k} ({next(r['release'] for r in rows if r['kernel'] == k)})" for k in kernels) + " |"
    lines = [header, "|" + "---|" * (2 + len(kernels))]
    for plan in plans:
        cells = [next(r["outcome"] for r in rows if r["kernel"] == k and r["plan"] == plan) for k in kernels]
        lines.append(f"| `{plan}` | {FAULTS[plan.split(':')[0]].must} | " + " | ".join(cells) + " |")
    print(json.dumps({"bench": "hardening-matrix", "date": time.strftime("%Y-%m-%d"), "host": host(), "rows": rows,
                      "markdown": "\n".join(lines)}, indent=1))


if __name__ == "__main__":
    main()
