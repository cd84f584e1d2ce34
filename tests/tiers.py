"""The suite's two tiers and the rotation of the full one (docs/testing.md#tiers).

Every e2e test is marked `gate` (CI runs it at every submission) or `full`
(run by `ci/test.sh --full`, and in CI one slice at a time). The full tier's
tests are cut into SLICES slices by module, so that a module's shared lab and
guests are made once per slice; CI runs slice `commit count % SLICES`, so
every full-tier test runs in CI at least once in every SLICES commits. The
steps after pytest (the other stacks' verifies, the ordinary user's pass)
take turns in the same rotation.

    python3 tests/tiers.py plan [K]     # what slice K (default: this commit's) holds
    python3 tests/tiers.py slice        # this commit's slice number
    python3 tests/tiers.py steps K      # the steps after pytest that slice K runs
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SLICES = 4

# Each module with full-tier tests -> its slice ("module::test" for one test
# of a module that goes elsewhere), balanced (with the steps
# after pytest below) by the modules' full-tier times in a whole run
# (docs/testing.md#the-rotation; python3 bench/suite_times.py artifacts/pytest.xml);
# tests/unit/test_tiers.py fails when a module with full-tier tests is missing.
FULL_SLICES = {
    # slice 0, with the ordinary user's pass
    "test_blkback.py": 0,
    # slice 1, with the trixie PVH verify
    "test_interrupts.py": 1,
    "test_snapshot.py": 1,
    "test_module_reload.py": 1,
    # slice 2, with the QEMU 7.2 HVM verify
    "test_debug.py": 2,
    "test_boot_failure.py": 2,
    "test_recovery.py": 2,
    "test_verify.py": 2,
    "test_byo.py": 2,
    "test_lab.py": 2,
    "test_kernel_tree.py": 2,
    "test_own_boot.py": 2,
    "test_backend_reload.py": 2,
    # slice 3, with the QEMU 7.2 PV verify
    "test_interrupts.py::test_build_killed_leaves_no_entry_and_the_next_build_sweeps_its_scratch": 3,
    "test_evtchn.py": 3,
    "test_guest.py": 3,
    "test_remote.py": 3,
    "test_devchan.py": 3,
    "test_xenstore.py": 3,
    "test_xenbus_trace.py": 3,
    "test_connect_system.py": 3,
    "test_plugin.py": 3,
}

# The steps after pytest (ci/test.sh), each in one slice: the ordinary user's
# lab tests and verify, the trixie dom0's PVH verify, and the stock QEMU 7.2
# verifies with an HVM and with a PV guest.
POST_STEPS = {
    "as-user": 0,
    "trixie-pvh": 1,
    "qemu-stock-hvm": 2,
    "qemu-stock-pv": 3,
}


def commit_slice(repo: Path | None = None) -> int:
    """This checkout's slice: its commit count modulo SLICES."""
    repo = repo or Path(__file__).resolve().parent.parent
    count = subprocess.run(["git", "-C", str(repo), "rev-list", "--count", "HEAD"], capture_output=True, text=True, check=True)
    return int(count.stdout.strip()) % SLICES


def slice_of(module_file: str, function: str) -> int | None:
    """The slice of test `function` (without its parameters) of a module."""
    module = Path(module_file).name
    return FULL_SLICES.get(f"{module}::{function}", FULL_SLICES.get(module))


def steps_of(k: int) -> list[str]:
    return [step for step, s in POST_STEPS.items() if s == k]


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("plan", "slice", "steps"):
        print(__doc__.strip().split("\n\n")[-1], file=sys.stderr)
        return 2
    if argv[0] == "slice":
        print(commit_slice())
        return 0
    k = int(argv[1]) if len(argv) > 1 else commit_slice()
    if not 0 <= k < SLICES:
        print(f"tiers: slice {k} does not exist: slices are 0 to {SLICES - 1}", file=sys.stderr)
        return 2
    if argv[0] == "steps":
        print(" ".join(steps_of(k)))
        return 0
    modules = sorted(m for m, s in FULL_SLICES.items() if s == k)  # "module::test" entries too
    print(f"slice {k} of {SLICES}: full-tier tests of {', '.join(modules)}; after pytest: {', '.join(steps_of(k)) or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
