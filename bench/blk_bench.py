"""Block I/O through the guest's blkfront to the Python backend (agent/blkback.py)
vs to kernel blkback, side by side on one guest: two disks of the same size
attached to it, one per backend, the workloads interleaved per run.

Workloads (O_DIRECT from Python in the guest, timed by the guest's clock):
  seq-read / seq-write   1 MiB requests over the first SEQ_MIB MiB
  rand-read / rand-write 4 KiB requests at random 4 KiB-aligned offsets
The ratio is Python backend / kernel blkback throughput (1.0: as fast).
The Python backend's own profile (cProfile, top functions by own time) of
one extra sequential-read pass says where its time goes.

Prints one JSON document. Usage:
  .venv/bin/python bench/blk_bench.py [--runs 3] [--lab bench-blk]"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from lab_bench import host  # noqa: E402

from xenlab import GuestSpec, Lab  # noqa: E402

DISK_MIB = 64
SEQ_MIB = 32
RAND_OPS = 400

GUEST_IO = r'''
import mmap, os, random, sys, time
dev, mode, size_mib, seq_mib, ops = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
write = mode.endswith("write")
fd = os.open(dev, (os.O_RDWR if write else os.O_RDONLY) | os.O_DIRECT)
if mode.startswith("seq"):
    buf = mmap.mmap(-1, 1 << 20)  # page-aligned, as O_DIRECT wants
    buf.write(os.urandom(1 << 20))
    t0 = time.perf_counter()
    for i in range(seq_mib):
        n = (os.pwritev if write else os.preadv)(fd, [buf], i << 20)
        assert n == 1 << 20, n
    took = time.perf_counter() - t0
    print(seq_mib * (1 << 20) / took / 1e6, seq_mib / took)
else:
    buf = mmap.mmap(-1, 4096)
    rng = random.Random(7)
    offsets = [rng.randrange(size_mib * 256) * 4096 for _ in range(ops)]
    t0 = time.perf_counter()
    for off in offsets:
        n = (os.pwritev if write else os.preadv)(fd, [buf], off)
        assert n == 4096, n
    took = time.perf_counter() - t0
    print(ops * 4096 / took / 1e6, ops / took)
'''

WORKLOADS = ("seq-read", "seq-write", "rand-read", "rand-write")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--lab", default="bench-blk")
    args = parser.parse_args()
    lab = Lab.open(args.lab)
    lab.ensure_up()
    booted = lab.booted  # stop it afterwards only if this run started it
    results: dict = {w: {"kernel": [], "python": []} for w in WORKLOADS}
    iops: dict = {w: {"kernel": [], "python": []} for w in WORKLOADS}
    try:
        with lab.guests() as guests:
            if any(g["name"] == "blkbench" for g in guests.list()):
                guests.destroy("blkbench")
            guest = guests.start(GuestSpec(name="blkbench", root="python", memory=160))
            try:
                guest.put(GUEST_IO.encode(), "/tmp/io.py")
                disks = {"kernel": guest.attach_disk(f"{DISK_MIB}M", backend="kernel"),
                         "python": guest.attach_disk(f"{DISK_MIB}M", backend="python")}
                for run in range(args.runs):
                    for workload in WORKLOADS:
                        order = ("kernel", "python") if run % 2 == 0 else ("python", "kernel")
                        for backend in order:
                            dev = disks[backend].device
                            out = guest.exec(f"python3 /tmp/io.py {dev} {workload} {DISK_MIB} {SEQ_MIB} {RAND_OPS}", timeout=600)
                            if not out.ok:
                                sys.exit(f"{workload} on {backend} failed: {out.stderr[-1500:]}")
                            mb_s, per_s = (float(x) for x in out.stdout.split())
                            results[workload][backend].append(mb_s)
                            iops[workload][backend].append(per_s)
                reports = {name: d.detach() for name, d in disks.items()}
                profiled = guest.attach_disk(f"{DISK_MIB}M", backend="python", profile=True)
                guest.exec(f"python3 /tmp/io.py {profiled.device} seq-read {DISK_MIB} {SEQ_MIB} {RAND_OPS}", timeout=600)
                profile = profiled.detach()["report"].get("profile", [])
            finally:
                guests.destroy("blkbench")
    finally:
        if booted:
            lab.down()
    table = {}
    for workload in WORKLOADS:
        k, p = (statistics.median(results[workload][b]) for b in ("kernel", "python"))
        table[workload] = {
            "kernel_mb_s": round(k, 2), "python_mb_s": round(p, 2), "ratio": round(p / k, 3),
            "kernel_ops_s": round(statistics.median(iops[workload]["kernel"]), 1),
            "python_ops_s": round(statistics.median(iops[workload]["python"]), 1),
            "samples_mb_s": {b: [round(x, 2) for x in results[workload][b]] for b in ("kernel", "python")},
        }
    python_report = reports["python"]["report"]
    print(json.dumps({
        "bench": "blk", "date": time.strftime("%Y-%m-%d"), "host": host(), "runs": args.runs,
        "disk_mib": DISK_MIB, "seq_mib": SEQ_MIB, "rand_ops": RAND_OPS, "results": table,
        "python_backend": {k: python_report.get(k) for k in ("requests", "indirect", "max_segments", "persistent", "persistent_grants",
                                                              "grants_mapped", "notifies_sent", "wakeups")},
        "python_profile_seq_read": profile,
    }, indent=1))


if __name__ == "__main__":
    main()
