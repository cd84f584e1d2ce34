"""The driver author's loop on the real lab: the minimal kernel's stock
frontends are modules; Linux's own xen-blkfront.c, patched
(examples/patched-blkfront), is built against the guest kernel and swapped
into a running guest with `xenlab guest module GUEST reload`: its disk goes
through a clean XenBus closedown and a fresh bring-up under the new module,
both traced, and keeps its data. A module that does not load leaves the
old one in, with the devices given back to it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from xenlab.agent.facts import DOM0_BRIDGE_IP
from xenlab.drivers.guest import CHANGE_LOCK
from xenlab.guest.spec import DiskSpec, GuestSpec

from .conftest import LAB, build_module, fresh_guest, xenlab

REPO = Path(__file__).resolve().parents[2]
BLOCK = "reload-keeps-data\n" * 227  # 4086 bytes, one block once padded


@pytest.fixture(scope="module")
def patched_blkfront(kernel_dir, tmp_path_factory) -> Path:
    """examples/patched-blkfront built as its Makefile says (`make`)."""
    src = tmp_path_factory.mktemp("patched-blkfront")
    for name in ("Makefile", "patched.patch"):
        shutil.copy(REPO / "examples/patched-blkfront" / name, src / name)
    proc = subprocess.run(["make", "-C", str(src), f"KDIR={kernel_dir}"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return src / "xen-blkfront.ko"


def module(name: str, *args: str, check: bool = True):
    return xenlab("guest", "module", "--name", LAB, name, *args, check=check)


def modules_of(name: str) -> dict:
    return {m["name"]: m for m in json.loads(module(name, "ls", "--json").stdout)["modules"]}


def handshakes(result: dict) -> dict:
    return {d["device"]: d["phases"] for d in result["devices"]}


@pytest.mark.gate
def test_patched_blkfront_reloaded_in_a_running_guest(lab, patched_blkfront):
    name = "mod-reload"
    with fresh_guest(lab, GuestSpec(name=name, disks=(DiskSpec(16),))):
        with lab.guests() as guests:
            guest = guests.get(name)
            before = modules_of(name)
            assert before["xen_blkfront"]["origin"] == "stock" and before["xen_blkfront"]["devices"] == ["vbd/51712"]
            wrote = guest.exec("dd of=/dev/xvda bs=4096 seek=3 count=1 conv=sync,fsync 2>/dev/null", input=BLOCK.encode())
            assert wrote.ok, wrote.stderr

            shown = module(name, "reload", str(patched_blkfront))
            said = shown.stdout + shown.stderr
            assert "xen-blkfront (patched): xvda connected" in said and "orderly closedown (backend first)" in said, said
            assert "xen_blkfront reloaded in mod-reload; vbd/51712 connected to it" in said, said

            after = modules_of(name)["xen_blkfront"]
            assert after["origin"] == "reloaded" and after["devices"] == ["vbd/51712"]
            read = guest.exec("dd if=/dev/xvda bs=4096 skip=3 count=1 2>/dev/null")
            assert read.stdout.startswith(BLOCK), read.stdout[:200]
            # The ring checks on the disk, now driven by the patched module.
            results = guest.check()
            assert results and all(r["ok"] for r in results), results

            # Traced: the disk closed down (backend first) and came up again.
            again = json.loads(module(name, "reload", str(patched_blkfront), "--json").stdout)
            assert again["outcome"] == ["loaded"] and again["violation"] is None
            phases = handshakes(again)["vbd/51712"]
            assert "orderly closedown (backend first)" in phases and "bring-up" in phases, again["devices"]


@pytest.mark.full
def test_a_module_that_does_not_load_leaves_the_old_one_in(lab, patched_blkfront, tmp_path):
    name = "mod-refused"
    with fresh_guest(lab, GuestSpec(name=name, disks=(DiskSpec(8),), net=True)):
        # Refused on the host, the guest untouched: not a module, another release, no such file.
        (tmp_path / "notes.ko").write_text("not a module")
        for args, says in (((str(tmp_path / "notes.ko"),), "is not a kernel module (not an ELF file)"),
                           ((str(tmp_path / "none.ko"),), "no such file"),
                           ((str(patched_blkfront), "bogus;reboot"), "write them as name=value words")):
            refused = module(name, "reload", *args, check=False)
            assert refused.returncode != 0 and says in refused.stdout + refused.stderr, refused.stdout + refused.stderr
        # Refused by the guest's kernel: a parameter it cannot parse (an unknown one it only ignores).
        # The stock module goes back in, the disk with it.
        failed = module(name, "reload", str(patched_blkfront), "max_queues=many", check=False)
        said = failed.stdout + failed.stderr
        assert failed.returncode != 0 and "did not load" in said and "the old one is back in" in said, said
        now = modules_of(name)
        assert now["xen_blkfront"]["origin"] == "stock" and now["xen_blkfront"]["devices"] == ["vbd/51712"], now
        with lab.guests() as guests:
            assert guests.exec(name, "dd if=/dev/xvda of=/dev/null bs=4096 count=1").ok
            # Another change under way (its lock held, as by a reload still running): refused, nothing touched.
            guests.exec(name, f"mkdir {CHANGE_LOCK} && date +%s > {CHANGE_LOCK}/since")
            busy = module(name, "reload", str(patched_blkfront), check=False)
            assert busy.returncode != 0 and "another module load, unload or reload runs" in busy.stdout + busy.stderr
            assert modules_of(name)["xen_blkfront"]["origin"] == "stock"
            guests.exec(name, f"rm -r {CHANGE_LOCK}")


@pytest.mark.full
def test_unload_then_load_gives_the_devices_back(lab, kernel_dir, patched_blkfront):
    name = "mod-unload"
    with fresh_guest(lab, GuestSpec(name=name, disks=(DiskSpec(8),), net=True)):
        out = json.loads(module(name, "unload", "xen-netfront", "--json").stdout)
        assert [f"{d['kind']}/{d['devid']}" for d in out["unplugged"]] == ["vif/0"]
        listed = json.loads(module(name, "ls", "--json").stdout)
        assert listed["unplugged"] == ["vif/0"] and "xen_netfront" not in {m["name"] for m in listed["modules"] if m["loaded"]}
        # The stock netfront from the kernel's build, loaded back by file: eth0 returns with its address.
        loaded = json.loads(module(name, "load", str(kernel_dir / "drivers/net/xen-netfront.ko"), "--json").stdout)
        assert [f"{d['kind']}/{d['devid']}" for d in loaded["plugged"]] == ["vif/0"] and loaded["violation"] is None
        with lab.guests() as guests:
            pinged = guests.exec(name, f"ping -c 2 -W 5 {DOM0_BRIDGE_IP}")
            assert pinged.ok, pinged.stdout + pinged.stderr
        refused = module(name, "load", str(patched_blkfront), check=False)
        assert refused.returncode != 0 and "has xen_blkfront loaded already" in refused.stdout + refused.stderr


@pytest.mark.full
def test_no_stock_keeps_a_frontend_off_and_yours_replaces_it_by_name(lab, patched_blkfront):
    off = GuestSpec(name="mod-nostock", disks=(DiskSpec(8),), no_stock=("xen-blkfront",))
    with fresh_guest(lab, off):
        listed = json.loads(module("mod-nostock", "ls", "--json").stdout)
        assert "vbd/51712" in listed["unbound"]
        assert {m["name"]: m["origin"] for m in listed["modules"]}["xen_blkfront"] == "kept-off"
    mine = GuestSpec(name="mod-yours", disks=(DiskSpec(8),), modules=str(patched_blkfront.parent))
    with fresh_guest(lab, mine):
        assert modules_of("mod-yours")["xen_blkfront"]["origin"] == "yours"
        with lab.guests() as guests:
            assert "xen-blkfront (patched): xvda connected" in guests.exec("mod-yours", "dmesg").stdout
    refused = xenlab("guest", "create", "--name", LAB, "mod-bad", "--no-stock", "xen-nosuch", check=False)
    assert refused.returncode != 0 and "has no such stock module" in refused.stdout + refused.stderr


@pytest.mark.full
def test_a_guest_that_panics_while_starting_leaves_its_core(lab):
    """As a guest that crashes later: the core is taken before the domain goes."""
    proc = xenlab("guest", "create", "--name", LAB, "mod-panic", "--extra", "rdinit=/nope init=/nope", check=False)
    said = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Kernel panic" in said and "its core is in " in said, said
    folder = said.split("its core is in ")[1].split()[0]
    log = xenlab("debug", "core-log", folder, "--panic").stdout
    assert "Kernel panic - not syncing: VFS: Unable to mount root fs" in log, log
    assert "mod-panic" not in xenlab("guest", "list", "--name", LAB).stdout


@pytest.mark.full
def test_the_plugins_reload_fixture_and_restore_to_stock(xenlab_guest_factory, xenlab_reload, patched_blkfront):
    guest = xenlab_guest_factory(disks=["8M"])
    swapped = xenlab_reload(guest, patched_blkfront)
    assert swapped["violation"] is None and any("xen-blkfront (patched)" in line for line in swapped["kernel_log"])
    assert modules_of(guest.name)["xen_blkfront"]["origin"] == "reloaded"
    back = json.loads(module(guest.name, "restore", "xen-blkfront", "--json").stdout)
    assert back["outcome"] == ["loaded"] and back["violation"] is None
    now = modules_of(guest.name)["xen_blkfront"]
    assert now["origin"] == "stock" and now["devices"] == ["vbd/51712"], now
    assert guest.exec("dd if=/dev/xvda of=/dev/null bs=4096 count=1 iflag=direct").ok


OOPSING_FRONTEND = """#include <linux/module.h>
static int __init oops(void) { pr_info("xen-blkfront (oopsing) loading\\n"); *(volatile int *)0 = 1; return 0; }
module_init(oops);
MODULE_LICENSE("GPL");
MODULE_ALIAS("xen:vbd");
"""


@pytest.mark.full
def test_a_module_that_oopses_leaves_the_guest_running_with_its_core(lab, kernel_dir, tmp_path):
    oopsing = build_module(kernel_dir, tmp_path, "xen-blkfront", OOPSING_FRONTEND)
    name = "mod-oops"
    with fresh_guest(lab, GuestSpec(name=name, disks=(DiskSpec(8),))):
        failed = module(name, "reload", str(oopsing), check=False)
        said = failed.stdout + failed.stderr
        assert failed.returncode == 1 and f"oopsed in guest '{name}'" in said and "its core is in " in said, said
        folder = said.split("its core is in ")[1].split()[0]
        log = xenlab("debug", "core-log", folder).stdout
        assert "xen-blkfront (oopsing) loading" in log and "Oops" in log, log[-2000:]
        with lab.guests() as guests:
            assert guests.exec(name, "echo alive").stdout.strip() == "alive"  # the guest runs on
