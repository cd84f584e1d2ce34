"""The backend author's loop, its logic on the host and in dom0's agent:
which Debian packages make dom0's kernel build directory, how a backend
module is recognised, and the record of what dom0 loaded. The swap itself
runs on the real lab (tests/e2e/test_backend_reload.py)."""

from __future__ import annotations

import pytest

from xenlab.agent import backendswap
from xenlab.build import headers
from xenlab.drivers import dom0 as drivers_dom0
from xenlab.drivers.modules import read_module
from xenlab.errors import ConfigError

from .test_guest_modules import compiled_module

SHOWN = """Package: linux-headers-6.1.0-57-amd64
Version: 6.1.192-3
Depends: linux-headers-6.1.0-57-common (= 6.1.192-3), linux-image-6.1.0-57-amd64 (= 6.1.192-3) | linux-image-6.1.0-57-amd64-unsigned (= 6.1.192-3), linux-kbuild-6.1 (= 6.1.192-3), linux-compiler-gcc-12-x86 (= 6.1.192-3)

Package: linux-headers-6.1.0-57-amd64
Version: 6.1.190-1
"""


def test_the_headers_package_and_its_common_and_kbuild_parts_at_one_version():
    assert headers.wanted_packages(SHOWN, "linux-headers-6.1.0-57-amd64") == [
        "linux-headers-6.1.0-57-amd64=6.1.192-3", "linux-headers-6.1.0-57-common=6.1.192-3", "linux-kbuild-6.1=6.1.192-3"]


def test_debians_arch_makefile_is_pointed_at_the_extracted_common_one(tmp_path):
    root, final = tmp_path / "scratch", tmp_path / "final"
    arch = root / "usr/src/linux-headers-6.1.0-57-amd64"
    common = final / "usr/src/linux-headers-6.1.0-57-common"
    arch.mkdir(parents=True)
    common.mkdir(parents=True)
    (arch / "Makefile").write_text("include /usr/src/linux-headers-6.1.0-57-common/Makefile\n")
    (common / "Makefile").write_text("VERSION = 6\nPATCHLEVEL = 1\nSUBLEVEL = 192\nEXTRAVERSION =\n")
    headers._relocate(root, final, "6.1.0-57-amd64")
    assert (arch / "Makefile").read_text() == f"include {common}/Makefile\n"
    assert headers.makefile_version(arch) == "6.1.192"
    with pytest.raises(ConfigError):
        headers.debian_kernel_dir("6.1; rm -rf /", "bookworm", tmp_path)


def test_a_backend_module_is_known_by_its_xen_backend_alias(tmp_path):
    ko = compiled_module(tmp_path, "xen-blkback", "vermagic=6.1.0-57-amd64 SMP \nalias=xen-backend:vbd\nname=xen_blkback")
    mod = read_module(ko)
    assert (mod.name, mod.kinds, mod.backend_kinds) == ("xen_blkback", (), ("vbd",))
    assert drivers_dom0._kinds_of("xen_blkback", mod) == ("vbd",)
    assert drivers_dom0._kinds_of("xen_netback", None) == ("vif",)
    front = read_module(compiled_module(tmp_path, "xen-blkfront", "vermagic=6.1.0 SMP \nalias=xen:vbd\nname=xen_blkfront"))
    with pytest.raises(ConfigError, match="is not a backend xenlab can swap"):
        drivers_dom0._kinds_of("xen_blkfront", front)
    with pytest.raises(ConfigError, match="is not a backend xenlab can swap"):
        drivers_dom0._kinds_of("xen_pciback", None)


def test_what_dom0_loaded_is_recorded_one_line_per_module(tmp_path, monkeypatch):
    monkeypatch.setattr(backendswap, "LOCK_DIR", str(tmp_path))
    monkeypatch.setattr(backendswap, "BACKENDS_IN_USE", str(tmp_path / "backend-modules"))
    assert backendswap._records() == {}
    backendswap._note("xen_blkback", "/run/xenlab/backend-modules.d/xen_blkback-ab.ko", "reloaded")
    backendswap._note("xen_netback", "-", "unloaded")
    backendswap._note("xen_blkback", "-", "stock")
    assert backendswap._records() == {"xen_blkback": ("-", "stock"), "xen_netback": ("-", "unloaded")}


def test_the_agent_refuses_an_unknown_mode():
    with pytest.raises(backendswap.SwapError, match="unknown mode"):
        backendswap.swap("xen_blkback", "vbd", mode="replace")
