"""doctor's orphan-reaping check, measured under real subreapers: one that
reaps at once (tini -s) and one that never does."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from xenlab.doctor import SLOW_REAP_SECONDS

MEASURE = "from xenlab.doctor import orphan_reap_seconds, _reaping_check; print(orphan_reap_seconds(limit=0.5)); print(_reaping_check().detail)"
PR_SET_CHILD_SUBREAPER = 36
# Adopts orphans and never reaps them: it waits for its own child only.
LAZY_SUBREAPER = ("import ctypes, subprocess, sys; ctypes.CDLL(None).prctl(%d, 1, 0, 0, 0); "
                  "sys.stdout.write(subprocess.run(sys.argv[1:], capture_output=True, text=True, check=True).stdout)"
                  % PR_SET_CHILD_SUBREAPER)


def measured_under(*wrapper: str) -> tuple[str, str]:
    out = subprocess.run([*wrapper, sys.executable, "-c", MEASURE], capture_output=True, text=True, check=True).stdout
    seconds, detail = out.splitlines()
    return seconds, detail


def test_an_orphan_is_reaped_at_once_under_tini():
    tini = shutil.which("tini")
    if tini is None:
        if os.environ.get("CI"):
            pytest.fail("tini is missing: ci/setup-host.sh installs it")
        pytest.skip("needs tini (ci/setup-host.sh installs it)")
    seconds, detail = measured_under(tini, "-s", "--")
    assert float(seconds) < SLOW_REAP_SECONDS
    assert "WARNING" not in detail and "reaped in" in detail


def test_a_subreaper_that_never_reaps_gets_the_warning_and_the_fix():
    seconds, detail = measured_under(sys.executable, "-c", LAZY_SUBREAPER)
    assert seconds == "None"  # still a zombie after the 0.5 s limit
    assert detail.startswith("WARNING: a killed orphan is reaped only after more than 3 s") and "tini -s" in detail
