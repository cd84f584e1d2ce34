"""The plugin's suite serial and under `pytest -n 2`, side by side on one
host: the same driver-style tests (each makes a guest with a disk, writes and
reads it back through blkfront, and destroys it), one lab vs a lab per
worker. Interleaved per run; labs are stopped between runs, so every run
includes its labs' boot (a snapshot restore once the snapshot exists).
The speed-up is serial / parallel wall time (above 1: parallel faster).

Prints one JSON document. Usage:
  .venv/bin/python bench/xdist_bench.py [--runs 2] [--tests 8]"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lab_bench import XENLAB, host, summary  # noqa: E402

SUITE = '''
import pytest


@pytest.mark.parametrize("n", range({tests}))
def test_guest_disk_round_trip(xenlab_guest_factory, n):
    guest = xenlab_guest_factory(disks=["16M"], memory="64M")
    out = guest.exec("dd if=/dev/urandom of=/tmp/a bs=64k count=16 2>/dev/null && dd if=/tmp/a of=/dev/xvda bs=64k 2>/dev/null "
                     "&& dd if=/dev/xvda of=/tmp/b bs=64k count=16 2>/dev/null && cmp /tmp/a /tmp/b && echo same")
    assert out.stdout.strip() == "same"
'''


def one_run(directory: Path, workers: int, name: str, config: str = "") -> float:
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--xenlab-name", name, str(directory)]
    if config:
        args += ["--xenlab-config", config]
    if workers > 1:
        args[3:3] = ["-n", str(workers)]
    started = time.monotonic()
    proc = subprocess.run(args, capture_output=True, text=True, cwd=directory, timeout=3600)
    took = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"the suite failed with {workers} worker(s):\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    for lab in [name] + [f"{name}-gw{i}" for i in range(workers)]:
        subprocess.run(XENLAB + ["down", "--lab", lab], capture_output=True)
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--tests", type=int, default=8)
    parser.add_argument("--worker-vcpus", type=int, default=0,
                        help="also time two workers whose labs have this many vCPUs (and dom0 as many)")
    args = parser.parse_args()
    serial, parallel, small = [], [], []
    with tempfile.TemporaryDirectory(prefix="xenlab-xdist-bench-") as tmp:
        directory = Path(tmp)
        (directory / "test_bench_suite.py").write_text(SUITE.format(tests=args.tests))
        small_config = directory / "small.toml"
        small_config.write_text(f"[lab]\nvcpus = {args.worker_vcpus}\n[dom0]\nvcpus = {args.worker_vcpus}\n")
        for _ in range(args.runs):
            serial.append(one_run(directory, 1, "bench-xd"))
            parallel.append(one_run(directory, 2, "bench-xd"))
            if args.worker_vcpus:
                small.append(one_run(directory, 2, "bench-xd-small", str(small_config)))

    def median(values):
        return sorted(values)[len(values) // 2]

    result = {
        "bench": "xdist", "host": host(), "tests": args.tests, "when": time.strftime("%Y-%m-%d"),
        "serial_s": summary(serial), "two_workers_s": summary(parallel), "speedup": round(median(serial) / median(parallel), 2),
    }
    if small:
        result.update({f"two_workers_{args.worker_vcpus}_vcpu_s": summary(small),
                       f"speedup_{args.worker_vcpus}_vcpu": round(median(serial) / median(small), 2)})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
