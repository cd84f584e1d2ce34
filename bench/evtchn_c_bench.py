"""Event channel round trips dom0 <-> domU: Python (xenlab's agent,
fast_pingpong/fast_echo) vs C (bench/c/xlping.c: the same protocol and
system calls), side by side between the same two domains, in the same
placement, runs interleaved. Two placements: `placed` (the default of
`xenlab evtchn ping`: the timing process, its vCPU and its port's interrupt
alone on a physical CPU, the domU on the other; the C program runs inside
agent placement.py and routes its own interrupt) and `as_is` (no pinning
beyond each timing process staying on its vCPU). The ratio is Python / C
round-trip time (1.0: Python costs nothing; the goal is at most 1.25).

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
from xenlab.deploy import agent_command, ensure_agent
from xenlab.guest.manager import Guests

SOURCE = Path(__file__).resolve().parent / "c" / "xlping.c"


def build(directory: Path) -> Path:
    if not shutil.which("gcc"):
        raise SystemExit("gcc is needed to build bench/c/xlping.c (ci/setup-host.sh installs it)")
    binary = directory / "xlping"
    subprocess.run(["gcc", "-O2", "-static", "-Wall", "-o", str(binary), str(SOURCE)], check=True)
    return binary


def c_round(lab, guests: Guests, guest: str, count: int, placed: bool) -> dict:
    with lab.ssh() as ssh:
        domid = domid_of(ssh, guest)
        command = f"/tmp/xlping ping {domid} {count} 20"
        if placed:  # the Python side's placement (agent placement.py), the C program inside it
            command = agent_command("placement", "--remote", str(domid), "--vcpu", "0", "--") + f" {command} 0"
        ssh.check(f"rm -f /tmp/xlping.out; ({command} > /tmp/xlping.out 2>/tmp/xlping.err &)")
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
        result = json.loads(lines[1])
        result["placement"] = ssh.check("cat /tmp/xlping.err").strip()[-400:]
        return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="bench")
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    modes = ("placed", "as_is")
    doc = {"bench": "evtchn-c-vs-python", "date": time.strftime("%Y-%m-%d"), "host": host(), "count_per_run": args.count,
           "runs": {f"{impl}_{mode}": [] for mode in modes for impl in ("c", "python")}}
    with tempfile.TemporaryDirectory() as tmp, lab_and_guest(args.name, None) as (lab, guest, where):
        doc.update(where)
        binary = build(Path(tmp))
        with lab.dom0() as dom0, Guests(lab) as guests:
            dom0.put(binary, "/tmp/xlping", mode=0o755)
            ensure_agent(dom0.ssh)
            guests.get(guest).put(binary, "/tmp/xlping", mode=0o755)
            for run in range(args.runs):
                for mode in modes:
                    for impl in (("c", "python") if run % 2 == 0 else ("python", "c")):
                        placed = mode == "placed"
                        out = c_round(lab, guests, guest, args.count, placed) if impl == "c" else ping(lab, guest, args.count, place=placed)
                        doc["runs"][f"{impl}_{mode}"].append(out)
    for mode in modes:
        for key in ("p50_us", "mean_us", "overall_mean_us"):
            c = statistics.median(r[key] for r in doc["runs"][f"c_{mode}"])
            py = statistics.median(r[key] for r in doc["runs"][f"python_{mode}"])
            doc.setdefault("summary", {}).setdefault(mode, {})[key] = {"c": round(c, 1), "python": round(py, 1), "python_over_c": round(py / c, 3)}
    emit(doc)


if __name__ == "__main__":
    main()
