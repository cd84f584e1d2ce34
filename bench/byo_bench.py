"""Benchmark the edit-build-test loop of a driver of your own (the xlecho
example): change one line of the driver, rebuild the module against the
guest kernel, create a guest that loads it, run the echo test against the
Python backend, destroy the guest. The loop is timed as a user runs it
(make, then `xenlab guest create` and the test through the library), and
each part by itself inside it: the ratio loop / (module build + guest create
as dom0 timed it + test) is what xenlab adds around the work.

Prints one JSON document. Uses lab NAME (default "bench"), booting it if it
is down and stopping it afterwards only then.
Usage: .venv/bin/python bench/byo_bench.py [--name LAB] [--runs N] [--count N]"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lab_bench import host, summary, timed  # noqa: E402

from xenlab.evtchn.devchan import python_backend  # noqa: E402
from xenlab import Lab  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GUEST = "bench-byo"
DEVID = 7


def echo_test(lab, count: int) -> dict:
    """The example's test: the driver's echo requests served by the Python backend, then its closedown."""
    with lab.guests() as guests:
        guest = guests.get(GUEST)
        with python_backend(lab, GUEST, devid=DEVID) as backend:
            deadline = time.monotonic() + 300
            while "echo requests of" not in (log := guest.exec("dmesg | grep 'xlecho:' || true").stdout):
                if time.monotonic() > deadline:
                    sys.exit(f"the driver never reported: {guest.exec('dmesg | tail').stdout}")
                time.sleep(0.5)
            guest.exec(f"echo xlchan-{DEVID} > /sys/bus/xen/drivers/xlecho/unbind")
    if f"{count} ok, 0 bad" not in log or backend.result["requests"] != count:
        sys.exit(f"the echo test failed: {log} / {backend.result}")
    return backend.result


def one_loop(lab, src: Path, kdir: Path, n: int, count: int) -> dict:
    start = time.monotonic()
    text = (src / "xlecho.c").read_text()
    marker = 'MODULE_DESCRIPTION("Example Xen PV frontend'
    (src / "xlecho.c").write_text(text.replace(marker, f'MODULE_VERSION("{n}");\n{marker}', 1) if n else text)
    t = time.monotonic()
    subprocess.run(["make", "-C", str(kdir), f"M={src}", "modules"], check=True, capture_output=True)
    make_s = time.monotonic() - t
    t = time.monotonic()
    took, out = timed("guest", "create", GUEST, "--lab", lab.name, "--modules", str(src), "--load", f"xlecho count={count} size=2048", "--json")
    create_cmd_s = time.monotonic() - t
    in_dom0_s = json.loads(out)["timings"]["total"]
    t = time.monotonic()
    result = echo_test(lab, count)
    test_s = time.monotonic() - t
    loop_s = time.monotonic() - start
    timed("guest", "destroy", GUEST, "--lab", lab.name)
    (src / "xlecho.c").write_text(text)
    return {"loop_s": loop_s, "module_build_s": make_s, "guest_create_cmd_s": create_cmd_s, "guest_create_in_dom0_s": in_dom0_s,
            "test_s": test_s, "requests_per_s": round(count / max(result["seconds"], 1e-3)),
            "ratio_loop_to_parts": loop_s / (make_s + in_dom0_s + test_s)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", default="bench")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--count", type=int, default=2000)
    args = parser.parse_args()
    booted = json.loads(timed("status", "--lab", args.name, "--json")[1])["state"] != "up"
    if booted:
        timed("up", "--lab", args.name)
    lab = Lab.open(args.name)
    kdir = Path(timed("guest", "kernel-dir")[1].strip())
    work = Path(tempfile.mkdtemp(prefix="xenlab-byo-bench-"))
    try:
        for name in ("xlecho.c", "Makefile"):
            shutil.copy(REPO / "examples/xlecho" / name, work / name)
        subprocess.run(["make", "-C", str(kdir), f"M={work}", "modules"], check=True, capture_output=True)  # warm: the first build compiles all
        runs = [one_loop(lab, work, kdir, n + 1, args.count) for n in range(args.runs)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if booted:
            timed("down", "--lab", args.name)
    keys = runs[0].keys()
    print(json.dumps({"host": host(), "lab": args.name, "count": args.count,
                      **{k: summary([r[k] for r in runs]) for k in keys}}, indent=2))


if __name__ == "__main__":
    main()
