"""Benchmark the driver author's loop on a stock driver (issue: "your patched
driver in seconds"): edit one line of Linux's xen-blkfront.c
(examples/patched-blkfront), rebuild the module, get it into a guest and run
the ring checks on its disk, two ways side by side in one run:

- create: a new guest each time (`guest create --modules DIR --disk 16M`,
  the ring checks, `guest destroy`): the loop before hot reload;
- reload: one guest kept, the module swapped (`guest module GUEST reload
  xen-blkfront.ko`), the ring checks.

Goal: reload loop <= 0.3 x the create loop. Prints one JSON document. Uses
lab NAME (default "bench"), booting it if it is down and stopping it
afterwards only then.
Usage: .venv/bin/python bench/reload_bench.py [--name LAB] [--runs N]"""

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

REPO = Path(__file__).resolve().parents[1]
GUEST = "bench-reload"


def edit_and_build(src: Path, kdir: Path, n: int) -> float:
    """Change one line (the patched message's text) and rebuild: seconds of make."""
    path = src / "xen-blkfront.c"
    text = path.read_text()
    start = text.index('pr_info("xen-blkfront (patched')
    end = text.index(":", start)
    path.write_text(text[:start] + f'pr_info("xen-blkfront (patched {n})' + text[end:])
    t = time.monotonic()
    subprocess.run(["make", "-C", str(kdir), f"M={src}", "modules"], check=True, capture_output=True)
    return time.monotonic() - t


def ring_checks(lab: str) -> float:
    took, out = timed("guest", "check", GUEST, "--lab", lab, "--json")
    results = json.loads(out)
    if not results or not all(r["ok"] for r in results):
        sys.exit(f"the ring checks failed: {results}")
    return took


def create_loop(lab: str, src: Path, kdir: Path, n: int) -> dict:
    start = time.monotonic()
    make_s = edit_and_build(src, kdir, n)
    create_s, _ = timed("guest", "create", GUEST, "--lab", lab, "--disk", "16M", "--modules", str(src), "--json")
    check_s = ring_checks(lab)
    loop_s = time.monotonic() - start
    timed("guest", "destroy", GUEST, "--lab", lab)
    return {"loop_s": loop_s, "module_build_s": make_s, "get_it_in_s": create_s, "ring_checks_s": check_s}


def reload_loop(lab: str, src: Path, kdir: Path, n: int) -> dict:
    start = time.monotonic()
    make_s = edit_and_build(src, kdir, n)
    reload_s, out = timed("guest", "module", GUEST, "reload", str(src / "xen-blkfront.ko"), "--lab", lab, "--json")
    if f"xen-blkfront (patched {n})" not in "\n".join(json.loads(out)["kernel_log"]):
        sys.exit(f"the reloaded module is not the one just built: {out}")
    check_s = ring_checks(lab)
    return {"loop_s": time.monotonic() - start, "module_build_s": make_s, "get_it_in_s": reload_s, "ring_checks_s": check_s}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", default="bench")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    booted = json.loads(timed("status", "--lab", args.name, "--json")[1])["state"] != "up"
    if booted:
        timed("up", "--lab", args.name)
    kdir = Path(timed("guest", "kernel-dir")[1].strip())
    work = Path(tempfile.mkdtemp(prefix="xenlab-reload-bench-"))
    create, reload = [], []
    try:
        for name in ("Makefile", "patched.patch"):
            shutil.copy(REPO / "examples/patched-blkfront" / name, work / name)
        subprocess.run(["make", "-C", str(work), f"KDIR={kdir}"], check=True, capture_output=True)  # warm: the first build
        for n in range(args.runs):  # side by side: one of each per round
            create.append(create_loop(args.name, work, kdir, 2 * n + 1))
            timed("guest", "create", GUEST, "--lab", args.name, "--disk", "16M")  # the guest the reload loop keeps (not timed)
            reload.append(reload_loop(args.name, work, kdir, 2 * n + 2))
            timed("guest", "destroy", GUEST, "--lab", args.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if booted:
            timed("down", "--lab", args.name)
    ratio = [r["loop_s"] / c["loop_s"] for c, r in zip(create, reload, strict=True)]
    print(json.dumps({"host": host(), "lab": args.name, "goal": "reload loop <= 0.3 x create loop",
                      "create": {k: summary([r[k] for r in create]) for k in create[0]},
                      "reload": {k: summary([r[k] for r in reload]) for k in reload[0]},
                      "ratio_reload_to_create": summary(ratio)}, indent=2))


if __name__ == "__main__":
    main()
