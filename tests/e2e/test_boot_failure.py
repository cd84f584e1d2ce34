"""A dom0 that crashes during boot makes `up` fail fast, with the log tail."""

from __future__ import annotations

import json
import time

import pytest

from .conftest import lab_prerequisites, xenlab

pytestmark = [pytest.mark.full, pytest.mark.own_labs]  # boots labs of its own: under xdist, beside the session lab's tests


def test_dom0_crash_fails_up_within_seconds(tmp_path):
    lab_prerequisites()
    cfg = tmp_path / "crash.toml"
    # No init in the initramfs: dom0's kernel panics right after it boots.
    cfg.write_text('[lab]\nboot_timeout = 240\n[dom0]\nkernel_args = "rdinit=/no-such-init"\n')
    start = time.monotonic()
    result = xenlab("--config", str(cfg), "up", "--name", "e2e-crash", check=False)
    took = time.monotonic() - start
    try:
        assert result.returncode != 0
        assert "crashed during boot: Kernel panic - not syncing" in result.stderr
        assert "serial.log" in result.stderr
        # Far inside boot_timeout: the crash was spotted, not waited out.
        assert took < 120, took
        assert json.loads(xenlab("status", "--name", "e2e-crash", "--json").stdout)["state"] == "down"
    finally:
        xenlab("down", "--name", "e2e-crash", check=False)
