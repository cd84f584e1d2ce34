"""The backend author's loop on the real lab: Linux's own xen-blkback,
patched (examples/patched-blkback), is built against Debian's headers of
dom0's kernel (`xenlab dom0 kernel-dir`) and swapped into the running dom0
with `xenlab dom0 module reload`: the guests' disks go through a clean
XenBus closedown and a fresh bring-up under the new backend, traced, and
keep their data. A backend that does not load leaves the old one in, its
devices given back to it. Each test puts Debian's own module back."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from xenlab.agent.backendswap import SWAP_LOCK
from xenlab.agent.facts import DOM0_BRIDGE_IP
from xenlab.guest.spec import DiskSpec, GuestSpec

from .conftest import LAB, XENLAB, build_module, fresh_guest, xenlab

REPO = Path(__file__).resolve().parents[2]
BLOCK = "backend-reload-keeps-data\n" * 157  # 4082 bytes, one block once padded
FAILING_BACKEND = """#include <linux/module.h>
static int __init refuse(void) { pr_info("xen-blkback (refusing) loaded\\n"); return -ENODEV; }
module_init(refuse);
MODULE_LICENSE("GPL");
MODULE_ALIAS("xen-backend:vbd");
"""


@pytest.fixture(scope="module")
def dom0_dirs(lab_info) -> tuple[Path, Path]:
    """`xenlab dom0 kernel-dir` and `--source`, as a user's Makefile runs them."""
    build = Path(xenlab("dom0", "kernel-dir", "--name", LAB).stdout.strip())
    source = Path(xenlab("dom0", "kernel-dir", "--name", LAB, "--source").stdout.strip())
    assert (build / "Module.symvers").exists() and (build / ".config").exists(), build
    assert (source / "drivers/block/xen-blkback/xenbus.c").exists(), source
    return build, source


@pytest.fixture(scope="module")
def patched_blkback(dom0_dirs, tmp_path_factory) -> Path:
    """examples/patched-blkback built as its Makefile says (`make`)."""
    build, source = dom0_dirs
    src = tmp_path_factory.mktemp("patched-blkback")
    for name in ("Makefile", "patched.patch"):
        shutil.copy(REPO / "examples/patched-blkback" / name, src / name)
    proc = subprocess.run(["make", "-C", str(src), f"KDIR={build}", f"SRC={source}"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return src / "xen-blkback.ko"


@pytest.fixture
def stock_after():
    """Debian's xen-blkback and xen-netback back in dom0 after the test, whatever it did."""
    yield
    for module in ("xen-blkback", "xen-netback"):
        listed = {m["name"]: m for m in json.loads(dom0_module("ls", "--json").stdout)["modules"]}
        if listed[module.replace("-", "_")]["origin"] != "stock" or not listed[module.replace("-", "_")]["loaded"]:
            dom0_module("restore", module)


def dom0_module(*args: str, check: bool = True):
    return xenlab("dom0", "module", "--name", LAB, *args, check=check)


def backends() -> dict:
    return {m["name"]: m for m in json.loads(dom0_module("ls", "--json").stdout)["modules"]}


@pytest.mark.gate
def test_patched_blkback_reloaded_under_a_running_guest(lab, patched_blkback, stock_after):
    name = "be-reload"
    with fresh_guest(lab, GuestSpec(name=name, disks=(DiskSpec(16),))) as info:
        domid = info["domid"]
        with lab.guests() as guests:
            guest = guests.get(name)
            before = backends()["xen_blkback"]
            assert before["origin"] == "stock" and f"{name}:vbd/51712" in before["devices"], before
            wrote = guest.exec("dd of=/dev/xvda bs=4096 seek=5 count=1 conv=sync,fsync 2>/dev/null", input=BLOCK.encode())
            assert wrote.ok, wrote.stderr

            shown = dom0_module("reload", str(patched_blkback))
            said = shown.stdout + shown.stderr
            assert f"xen-blkback (patched): backend/vbd/{domid}/51712 connected" in said, said
            assert "orderly closedown (backend first)" in said and f"xen_blkback reloaded in dom0; {name}:vbd/51712 served by it" in said, said
            after = backends()["xen_blkback"]
            assert after["origin"] == "reloaded" and after["file"] and f"{name}:vbd/51712" in after["devices"], after

            read = guest.exec("dd if=/dev/xvda bs=4096 skip=5 count=1 iflag=direct 2>/dev/null")
            assert read.stdout.startswith(BLOCK), read.stdout[:200]
            results = guest.check()  # the ring checks on the disk, now served by the patched backend
            assert results and all(r["ok"] for r in results), results

            back = json.loads(dom0_module("restore", "xen-blkback", "--json").stdout)
            assert back["outcome"] == ["loaded"] and back["violation"] is None, back
            phases = {(d["domid"], d["device"]): d["phases"] for d in back["devices"]}
            assert "bring-up" in phases[(domid, "vbd/51712")], back["devices"]
            assert backends()["xen_blkback"]["origin"] == "stock"


@pytest.mark.full
def test_a_backend_that_does_not_load_leaves_the_old_one_in(lab, dom0_dirs, patched_blkback, tmp_path, stock_after):
    failing = build_module(dom0_dirs[0], tmp_path, "xen-blkback", FAILING_BACKEND)
    name = "be-refused"
    with fresh_guest(lab, GuestSpec(name=name, disks=(DiskSpec(8),))):
        failed = dom0_module("reload", str(failing), check=False)
        said = failed.stdout + failed.stderr
        assert failed.returncode != 0 and "did not load in dom0" in said and "has its old xen_blkback back" in said, said
        assert "xen-blkback (refusing) loaded" in said, said  # dom0's kernel lines, shown
        now = backends()["xen_blkback"]
        assert now["loaded"] and now["origin"] == "stock" and f"{name}:vbd/51712" in now["devices"], now
        with lab.guests() as guests:
            assert guests.exec(name, "dd if=/dev/xvda of=/dev/null bs=4096 count=1 iflag=direct").ok

            # A guest using its disk (as swap: the minimal kernel has no disk
            # file system): refused before anything is taken away.
            assert guests.exec(name, "mkswap /dev/xvda >/dev/null && swapon /dev/xvda").ok
            mounted = dom0_module("reload", str(patched_blkback), check=False)
            assert mounted.returncode != 0 and "has /dev/xvda mounted (or as swap)" in mounted.stdout + mounted.stderr
            assert backends()["xen_blkback"]["origin"] == "stock"
            assert guests.exec(name, "swapoff /dev/xvda").ok

        # Another swap under way (its lock held): refused, nothing touched.
        held = subprocess.Popen([*XENLAB, "ssh", "--name", LAB, "--", f"flock {SWAP_LOCK} sleep 20"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            busy = None
            for _ in range(20):
                busy = dom0_module("reload", str(patched_blkback), check=False)
                if "another backend module" in busy.stdout + busy.stderr:
                    break
            assert busy is not None and busy.returncode != 0 and "another backend module load, unload or reload runs in dom0" in busy.stderr
        finally:
            held.wait(timeout=60)


@pytest.mark.full
def test_netback_unloaded_then_restored_gives_the_vifs_back(lab, stock_after):
    name = "be-net"
    with fresh_guest(lab, GuestSpec(name=name, net=True)):
        out = json.loads(dom0_module("unload", "xen-netback", "--json").stdout)
        assert f"{name}:vif/0" in [f"{d['guest']}:{d['kind']}/{d['devid']}" for d in out["unplugged"]], out
        listed = json.loads(dom0_module("ls", "--json").stdout)
        assert f"{name}:vif/0" in listed["unplugged"], listed
        assert not {m["name"]: m for m in listed["modules"]}["xen_netback"]["loaded"]

        back = json.loads(dom0_module("restore", "xen-netback", "--json").stdout)
        assert f"{name}:vif/0" in [f"{d['guest']}:{d['kind']}/{d['devid']}" for d in back["plugged"]] and back["violation"] is None, back
        with lab.guests() as guests:
            pinged = guests.exec(name, f"ping -c 2 -W 5 {DOM0_BRIDGE_IP}")
            assert pinged.ok, pinged.stdout + pinged.stderr


@pytest.mark.full
def test_refusals_name_what_is_wrong(lab, kernel_dir, tmp_path):
    (tmp_path / "notes.ko").write_text("not a module")
    blkfront = kernel_dir / "drivers/block/xen-blkfront.ko"
    other = build_module(kernel_dir, tmp_path / "other", "xen-blkback", FAILING_BACKEND)  # for the guest kernel, not dom0's
    for args, says in ((("reload", str(tmp_path / "notes.ko")), "is not a kernel module (not an ELF file)"),
                       (("reload", str(tmp_path / "none.ko")), "no such file"),
                       (("reload", str(blkfront)), "is not a backend xenlab can swap"),
                       (("unload", "xen-pciback"), "is not a backend xenlab can swap"),
                       (("reload",), "needs the .ko file"),
                       (("reload", str(other)), "but dom0 runs"),
                       (("reload", str(blkfront), "a=1;reboot"), "write them as name=value words")):
        refused = dom0_module(*args, check=False)
        assert refused.returncode != 0 and says in refused.stdout + refused.stderr, (args, refused.stdout + refused.stderr)
    assert backends()["xen_blkback"]["origin"] == "stock"


@pytest.mark.full
def test_a_debian_kernel_guest_takes_blkfront_built_against_dom0s_headers(lab, dom0_dirs, tmp_path):
    """The frontend half for `--kernel debian`: dom0's kernel-dir serves its modules too."""
    build, source = dom0_dirs
    src = tmp_path / "patched-blkfront"
    shutil.copytree(REPO / "examples/patched-blkfront", src)
    made = subprocess.run(["make", "-C", str(src), f"KDIR={build}", f"SRC={source}"], capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    name = "be-debian"
    with fresh_guest(lab, GuestSpec(name=name, kernel="debian", disks=(DiskSpec(8),))):
        shown = xenlab("guest", "module", "--name", LAB, name, "reload", str(src / "xen-blkfront.ko"))
        said = shown.stdout + shown.stderr
        assert "xen-blkfront (patched): xvda connected" in said and f"xen_blkfront reloaded in {name}" in said, said
        with lab.guests() as guests:
            assert guests.exec(name, "dd if=/dev/xvda of=/dev/null bs=4096 count=1 iflag=direct").ok


@pytest.mark.full
def test_the_plugins_dom0_reload_fixture(xenlab_guest_factory, xenlab_dom0_reload, patched_blkback, stock_after):
    guest = xenlab_guest_factory(disks=["8M"])
    swapped = xenlab_dom0_reload(patched_blkback)
    assert swapped["violation"] is None and swapped["outcome"] == ["loaded"], swapped
    assert any("xen-blkback (patched)" in line for line in swapped["kernel_log"]), swapped["kernel_log"]
    assert f"{guest.name}:vbd/51712" in backends()["xen_blkback"]["devices"]
    assert guest.exec("dd if=/dev/xvda of=/dev/null bs=4096 count=1 iflag=direct").ok
