"""Your own Xen and dom0 kernel: `xenlab up --xen FILE --dom0-kernel FILE
--dom0-modules DIR` boots them, checks that what booted is what was given
(Xen's build id, dom0's release) and shows them in status. The files here
are the dom0 image's own, copied out as a user's build would be (a gzipped
xen, a bzImage, a modules_install tree taken from the image with debugfs),
so the test needs no Xen or kernel build of its own."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess

import pytest

from xenlab.build import dom0 as images
from xenlab.build.elf import build_id
from xenlab.config import load

from .conftest import lab_prerequisites, xenlab

pytestmark = [pytest.mark.full, pytest.mark.own_labs]  # boots labs of its own: under xdist, beside the session lab's tests

LAB = "e2e-own"


@pytest.fixture(scope="module")
def own_files(tmp_path_factory):
    lab_prerequisites()
    image = images.find(load())
    assert image is not None, "build the dom0 image first (xenlab build)"
    work = tmp_path_factory.mktemp("own")
    xen = image.xen.read_bytes()
    (work / "xen.gz").write_bytes(gzip.compress(xen))
    shutil.copy(image.kernel, work / "bzImage")
    release = image.manifest["kernel_version"]
    modules = work / "modules/lib/modules"
    modules.mkdir(parents=True)
    subprocess.run(["debugfs", "-R", f"rdump /lib/modules/{release} {modules}", str(image.rootfs)], check=True, capture_output=True)
    assert (modules / release / "modules.dep").exists()
    return {"xen": work / "xen.gz", "kernel": work / "bzImage", "modules": work / "modules", "release": release, "build_id": build_id(xen)}


def test_boot_your_own_xen_and_dom0_kernel(own_files):
    xenlab("down", "--lab", LAB)
    info = json.loads(xenlab("up", "--lab", LAB, "--xen", str(own_files["xen"]), "--dom0-kernel", str(own_files["kernel"]),
                             "--dom0-modules", str(own_files["modules"]), "--json").stdout)
    try:
        assert info["boot"]["user_xen"] == str(own_files["xen"]) and info["boot"]["user_dom0_kernel"] == str(own_files["kernel"])
        assert info["boot"]["initramfs"] != str(images.find(load()).initramfs)  # one carrying the given modules
        st = json.loads(xenlab("status", "--lab", LAB, "--json").stdout)
        assert st["xen_build_id"] == own_files["build_id"] and st["dom0_kernel_release"] == own_files["release"]
        # dom0 runs with the modules that came in the initramfs: its Xen backends are loaded.
        mods = xenlab("ssh", "--lab", LAB, "--", "cat /proc/modules").stdout
        assert "xen_blkback" in mods and "xen_netback" in mods
    finally:
        xenlab("down", "--lab", LAB)


def test_your_own_files_refused_with_reasons_before_anything_boots(own_files, tmp_path):
    not_xen = tmp_path / "xen.gz"
    not_xen.write_bytes(gzip.compress(b"not a hypervisor"))
    bad = xenlab("up", "--lab", LAB, "--xen", str(not_xen), check=False)
    assert bad.returncode == 2 and "is not a Xen hypervisor image" in bad.stderr
    lonely = xenlab("up", "--lab", LAB, "--dom0-kernel", str(own_files["kernel"]), check=False)
    assert lonely.returncode == 2 and "--dom0-kernel needs --dom0-modules" in lonely.stderr
    other = tmp_path / "other/lib/modules/9.9.9"
    other.mkdir(parents=True)
    (other / "modules.dep").write_text("")
    wrong = xenlab("up", "--lab", LAB, "--dom0-kernel", str(own_files["kernel"]), "--dom0-modules", str(tmp_path / "other"), check=False)
    assert wrong.returncode == 2 and "no modules for kernel" in wrong.stderr and "9.9.9" in wrong.stderr
    assert json.loads(xenlab("status", "--lab", LAB, "--json").stdout)["state"] == "down"
