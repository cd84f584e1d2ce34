"""Bring your own code: a C frontend driver of the user's (examples/xlecho),
built against the guest kernel xenlab boots, loaded at boot with --modules
and --load, talking to xenlab's Python backend in dom0 over a granted ring
page and an event channel; your own kernel file; files copied in and out.
Every refusal leaves no guest behind."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from xenlab.agent.facts import GUESTS_DIR
from xenlab.errors import ConfigError, GuestError
from xenlab.evtchn.devchan import python_backend
from xenlab.guest.spec import DiskSpec, GuestSpec
from xenlab.xenstore.client import XenStore
from xenlab.xenstore.recorder import traced
from xenlab.xenstore.tracer import check, violation_summary

from .conftest import LAB, fresh_guest, xenlab

REPO = Path(__file__).resolve().parents[2]
DEVID = 7
COUNT = 2000


@pytest.fixture(scope="module")
def xlecho(kernel_dir, tmp_path_factory) -> Path:
    """The example driver, built out of tree against the guest kernel as its README says."""
    src = tmp_path_factory.mktemp("xlecho")
    for name in ("xlecho.c", "Makefile"):
        shutil.copy(REPO / "examples/xlecho" / name, src / name)
    proc = subprocess.run(["make", "-C", str(kernel_dir), f"M={src}", "modules"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (src / "xlecho.ko").exists()
    return src


def guest_names(dom0) -> str:
    return dom0(f"xl list; ls {GUESTS_DIR} 2>/dev/null", check=False).stdout


@pytest.mark.gate
def test_c_frontend_against_the_python_backend(lab, xlecho):
    name = "byo-xlecho"
    spec = GuestSpec(name=name, modules=str(xlecho), load=(f"xlecho count={COUNT} size=2048",))
    with fresh_guest(lab, spec):
        with lab.guests() as guests:
            guest = guests.get(name)
            assert "xlecho" in guest.exec("cat /proc/modules").stdout  # loaded at boot, before the ready line
            with XenStore.for_lab(lab, timeout=30) as store, traced(store, name) as recorder:
                with python_backend(lab, name, devid=DEVID) as backend:
                    deadline = time.monotonic() + 300
                    # The module's own summary line (its load also logs an "xlecho:" taint line).
                    while "echo requests of" not in (log := guest.exec("dmesg | grep 'xlecho:' || true").stdout):
                        assert time.monotonic() < deadline, guest.exec("dmesg | tail -n 30").stdout
                        time.sleep(2)
                    # A frontend-initiated closedown: unbinding the driver from the device.
                    unbind = guest.exec(f"echo xlchan-{DEVID} > /sys/bus/xen/drivers/xlecho/unbind")
                    assert unbind.ok, unbind.stderr
                recorder.wait(lambda t: any(c.side == "backend" and c.state is None for c in t), 30)
            timeline = list(recorder.timeline)
            assert guest.exec("rmmod xlecho").ok  # nothing holds it any more
    assert f"{COUNT} echo requests of 2048 bytes: {COUNT} ok, 0 bad" in log, log
    result = backend.result
    assert result["ended"] == "frontend-closed" and result["requests"] == COUNT and result["bad_requests"] == 0
    assert result["bytes_in"] == result["bytes_out"] == COUNT * 2048
    assert result["states"] == ["InitWait", "Connected", "Closing", "Closed"]
    assert result["mapped_after"] is False and result["bound_after"] is False
    reports = [r for r in check(timeline) if r.device.startswith("xlchan")]
    assert len(reports) == 1 and violation_summary(reports) is None, "\n".join(str(r.to_dict()) for r in reports)
    assert "bring-up" in " ".join(reports[0].phases) and "closedown" in " ".join(reports[0].phases)


@pytest.mark.full
def test_module_built_for_another_kernel_is_refused(lab, xlecho, tmp_path, dom0):
    bad = tmp_path / "xlecho.ko"
    data = (xlecho / "xlecho.ko").read_bytes()
    at = data.index(b"vermagic=") + len(b"vermagic=")
    release = data[at:].split(b" ")[0]
    bad.write_bytes(data[:at] + b"9" * len(release) + data[at + len(release):])
    with lab.guests() as guests, pytest.raises(ConfigError) as err:
        guests.create(GuestSpec(name="byo-vermagic", modules=str(tmp_path), load=("xlecho",)))
    assert "vermagic" in err.value.message and "9" * len(release) in err.value.message
    assert "byo-vermagic" not in guest_names(dom0)


@pytest.mark.full
def test_module_that_fails_to_load_fails_the_create(lab, xlecho, dom0):
    # size=0 makes the driver's init return -EINVAL
    with lab.guests() as guests, pytest.raises(GuestError) as err:
        guests.create(GuestSpec(name="byo-noload", modules=str(xlecho), load=("xlecho size=0",), timeout=120))
    assert "cannot load module xlecho" in err.value.message and "Invalid" in err.value.message
    assert "byo-noload" not in guest_names(dom0)


@pytest.mark.full
def test_bad_module_arguments_are_refused_before_anything_starts(lab, xlecho, tmp_path, dom0):
    cases = [
        (GuestSpec(name="byo-bad1", modules=str(xlecho), load=("nosuch",)), "no nosuch.ko"),
        (GuestSpec(name="byo-bad2", modules=str(tmp_path / "missing"), load=("xlecho",)), "no such directory"),
        (GuestSpec(name="byo-bad3", modules=str(tmp_path)), "no .ko files"),
        (GuestSpec(name="byo-bad4", kernel=str(xlecho / "xlecho.c")), "not a Linux kernel"),
        (GuestSpec(name="byo-bad5", kernel=str(xlecho / "xlecho.ko")), "not a Linux kernel"),
        (GuestSpec(name="byo-bad6", add=(f"{tmp_path}/none:/x",)), "does not exist"),
    ]
    with lab.guests() as guests:
        for spec, words in cases:
            with pytest.raises(ConfigError) as err:
                guests.create(spec.validate())
            assert words in err.value.message, (spec, err.value.message)
    assert "byo-bad" not in guest_names(dom0)


@pytest.mark.gate
def test_your_own_kernel_file_and_added_files(lab, tmp_path):
    built = json.loads(xenlab("guest", "build", "--json").stdout)
    bzimage = Path(built["kernel"])
    tool = tmp_path / "hello.sh"
    tool.write_text("#!/bin/sh\necho hello from the host\n")
    tool.chmod(0o750)
    spec = GuestSpec(name="byo-kernel", kernel=str(bzimage), add=(f"{tool}:/usr/bin/hello",))
    with fresh_guest(lab, spec):
        with lab.guests() as guests:
            guest = guests.get("byo-kernel")
            assert guest.exec("hello").stdout == "hello from the host\n"
            assert guest.exec("stat -c %a /usr/bin/hello").stdout.strip() == "750"
            release = guest.exec("uname -r").stdout.strip()
    assert release and release in bzimage.read_bytes().decode("latin-1")


@pytest.mark.gate
def test_cp_to_and_from_a_guest_without_network_and_dom0(lab, tmp_path):
    payload = tmp_path / "payload.bin"
    payload.write_bytes(os.urandom(100_000) + b"\0\n\xff")
    payload.chmod(0o640)
    with fresh_guest(lab, GuestSpec(name="byo-cp", disks=(DiskSpec(8),))):
        xenlab("cp", "--lab", LAB, str(payload), "byo-cp:/tmp/")
        back = tmp_path / "back"
        back.mkdir()
        xenlab("cp", "--lab", LAB, "byo-cp:/tmp/payload.bin", str(back))
        assert (back / "payload.bin").read_bytes() == payload.read_bytes()
        assert stat.S_IMODE((back / "payload.bin").stat().st_mode) == 0o640
        missing = xenlab("cp", "--lab", LAB, "byo-cp:/nonexistent", str(back), check=False)
        assert missing.returncode == 1 and "No such file or directory" in missing.stderr
        directory = xenlab("cp", "--lab", LAB, "byo-cp:/tmp", str(back), check=False)
        assert directory.returncode == 1 and "not a regular file" in directory.stderr
    xenlab("cp", "--lab", LAB, str(payload), "dom0:/tmp/byo-payload")
    xenlab("cp", "--lab", LAB, "dom0:/tmp/byo-payload", str(tmp_path / "from-dom0"))
    assert (tmp_path / "from-dom0").read_bytes() == payload.read_bytes()
    assert stat.S_IMODE((tmp_path / "from-dom0").stat().st_mode) == 0o640
    nodir = xenlab("cp", "--lab", LAB, str(payload), "dom0:/nonexistent-dir/x", check=False)
    assert nodir.returncode == 1 and "No such file or directory" in nodir.stderr
