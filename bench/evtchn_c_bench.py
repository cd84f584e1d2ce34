"""Event channel round trips dom0 <-> domU: Python (xenlab's agent,
fast_pingpong/fast_echo) vs C (bench/c/xlping.c: the same protocol and
system calls), side by side between the same two domains, same placement
(as the lab is: no pinning beyond each timing process staying on its vCPU),
runs interleaved. The ratio is Python / C round-trip time (1.0: Python costs
nothing; the goal is at most 1.25).

Prints one JSON document. Usage:
  .venv/bin/python bench/evtchn_c_bench.py [--name bench] [--count 1000] [--runs 3]"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from ring_bench import emit, host, lab_and_guest  # shared helpers (lab up, python domU)

from xenlab.evtchn.ping import ping
from xenlab.guest.agentrun import domid_of
from xenlab.guest.manager import Guests

SOURCE = Path(__file__).resolve().parent / "c" / "xlping.c"


def build(directory: Path) -> Path:
    if not shutil.which("gcc"):
        raise SystemExit("gcc is needed to build bench/c/xlping.c (ci/setup-host.sh installs it)")
    binary = directory / "xlping"
    subprocess.run(["gcc", "-O2", "-static", "-Wall", "-o", str(binary), str(SOURCE)], check=True)
    return binary


def c_round(lab, guests: Guests, guest: str, count: int) -> dict:
    with lab.ssh() as ssh:
        domid = domid_of(ssh, guest)
        ssh.check(f"rm -f /tmp/xlping.out; (/tmp/xlping ping {domid} {count} 20 > /tmp/xlping.out 2>&1 &)")
        deadline = time.monotonic() + 60
        while not (lines := ssh.check("cat /tmp/xlping.out").splitlines()):
            if time.monotonic() > deadline:
                raise SystemExit("the C ping never offered a port")
            time.sleep(0.2)
        port = json.loads(lines[0])["port"]
        pong = guests.exec(guest, f"/tmp/xlping pong 0 {port} {count + 20}", timeout=300)
        if not pong.ok:
            raise SystemExit(f"the C pong failed: {pong.stderr}")
        while len(lines := ssh.check("cat /tmp/xlping.out").splitlines()) < 2:
            if time.monotonic() > deadline + 240:
                raise SystemExit(f"the C ping never finished: {lines}")
            time.sleep(0.2)
        return json.loads(lines[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="bench")
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    doc = {"bench": "evtchn-c-vs-python", "date": time.strftime("%Y-%m-%d"), "host": host(), "count_per_run": args.count,
           "runs": {"c": [], "python": []}}
    with tempfile.TemporaryDirectory() as tmp, lab_and_guest(args.name, None) as (lab, guest, where):
        doc.update(where)
        binary = build(Path(tmp))
        with lab.dom0() as dom0, Guests(lab) as guests:
            dom0.put(binary, "/tmp/xlping", mode=0o755)
            guests.get(guest).put(binary, "/tmp/xlping", mode=0o755)
            for run in range(args.runs):
                for impl in (("c", "python") if run % 2 == 0 else ("python", "c")):
                    if impl == "c":
                        doc["runs"]["c"].append(c_round(lab, guests, guest, args.count))
                    else:
                        doc["runs"]["python"].append(ping(lab, guest, args.count, place=False))
    for key in ("p50_us", "mean_us", "overall_mean_us"):
        c = statistics.median(r[key] for r in doc["runs"]["c"])
        py = statistics.median(r[key] for r in doc["runs"]["python"])
        doc.setdefault("summary", {})[key] = {"c": round(c, 1), "python": round(py, 1), "python_over_c": round(py / c, 3)}
    emit(doc)


if __name__ == "__main__":
    main()
