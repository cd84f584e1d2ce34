"""The support matrix of docs/guest-types.md: `xenlab verify` with each guest
type on a lab of each dom0 suite (its Xen) and QEMU stack, one lab at a time,
each check's result per cell. A type a lab cannot run is tried all the same: the cell says
how it was refused. Each lab is driven by `xenlab` in its own process:
libvirt's embedded driver serves one lab per process.

Prints one JSON document (cells, plus the table as Markdown). Usage:
  .venv/bin/python bench/support_matrix.py [--labs bookworm/stock,bookworm,trixie] [--types pv,pvh,hvm] [--vcpus 1]

A lab is SUITE or SUITE/QEMU (a `xenlab up --qemu` value: stock, backports);
the default is each suite on the default QEMU.

Labs get one vCPU by default: under TCG, PVH and HVM guests need it
(docs/guest-types.md); PV runs the same on one or two."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from lab_bench import host  # noqa: E402

from xenlab.agent.facts import XEN_VERSIONS  # noqa: E402

XENLAB = [sys.executable, "-m", "xenlab"]


def xenlab(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(XENLAB + list(args), capture_output=True, text=True)
    if check and proc.returncode != 0:
        sys.exit(f"xenlab {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--labs", default=",".join(XEN_VERSIONS), help="SUITE or SUITE/QEMU, comma-separated")
    parser.add_argument("--types", default="pv,pvh,hvm")
    parser.add_argument("--vcpus", default="1", help="the labs' vCPUs (dom0's follow)")
    args = parser.parse_args()
    labs, types = [entry.partition("/")[::2] for entry in args.labs.split(",")], args.types.split(",")
    cells = []
    for suite, qemu_stack in labs:
        lab = f"matrix-{suite}-{qemu_stack or 'default'}"
        try:
            xenlab("up", "--lab", lab, "--suite", suite, "--vcpus", args.vcpus, *(["--qemu", qemu_stack] if qemu_stack else []))
            status = json.loads(xenlab("status", "--lab", lab, "--json").stdout)
            xen, qemu = status["xen_version"], status["versions"]["qemu"]
            for guest_type in types:
                started = time.monotonic()
                with tempfile.NamedTemporaryFile(suffix=".json") as report:
                    proc = xenlab("verify", "--lab", lab, "--guest", f"m-{guest_type}", "--guest-type", guest_type, "--json", report.name,
                                  check=False)
                    if Path(report.name).stat().st_size:
                        results = json.load(open(report.name))["checks"]
                    else:  # refused before any check ran: the guest type on this lab
                        why = next((line.removeprefix("error: ") for line in proc.stderr.splitlines() if line.startswith("error: ")), proc.stderr)
                        results = [{"name": "guest.create", "state": "REFUSED", "evidence": why}]
                cells.append({"suite": suite, "xen": xen, "qemu": qemu, "type": guest_type, "seconds": round(time.monotonic() - started, 1),
                              "results": {r["name"]: {"state": r["state"], "evidence": r["evidence"]} for r in results}})
                passed = sum(r["state"] == "SUCCESS" for r in results)
                print(f"{suite} QEMU {qemu} {guest_type}: {passed}/{len(results)} SUCCESS", file=sys.stderr)
        finally:
            xenlab("down", "--lab", lab, check=False)
    checks = list(dict.fromkeys(name for cell in cells for name in cell["results"]))
    header = "| check | " + " | ".join(f"Xen {c['xen']} ({c['suite']}), QEMU {c['qemu']}, {c['type'].upper()}" for c in cells) + " |"
    lines = [header, "|" + "---|" * (1 + len(cells))]
    for check in checks:
        row = []
        for cell in cells:
            result = cell["results"].get(check)
            if result is None:
                row.append("-")
            elif check == "guest.create" and result["state"] != "SUCCESS":
                row.append(f"{result['state']}: {result['evidence'][:110]}")
            else:
                row.append(result["state"])
        lines.append(f"| {check} | " + " | ".join(row) + " |")
    print(json.dumps({"benchmark": "support-matrix", "host": host(), "cells": cells, "markdown": "\n".join(lines)}, indent=2))


if __name__ == "__main__":
    main()
