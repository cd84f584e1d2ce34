"""The driver author's loop, its logic on the host: reading a module the
user hands over, parsing what a guest reports of its modules and devices,
the swap script, and the device records replug.py attaches again. The loop
itself runs on the real lab (tests/e2e/test_module_reload.py)."""

from __future__ import annotations

import subprocess

import pytest

from xenlab.agent import replug
from xenlab.build import kernel
from xenlab.drivers import guest as modules
from xenlab.errors import ConfigError, GuestError


def compiled_module(tmp_path, name: str, modinfo: str):
    src = tmp_path / f"{name}.c"
    body = modinfo.replace('"', '\\"').replace("\n", "\\0")
    src.write_text(f'const char m[] __attribute__((section(".modinfo"), used)) = "{body}";\n')
    subprocess.run(["cc", "-c", str(src), "-o", str(tmp_path / f"{name}.ko")], check=True)
    return tmp_path / f"{name}.ko"


def test_a_frontend_module_is_read_with_its_device_types(tmp_path):
    ko = compiled_module(tmp_path, "xen-blkfront", "vermagic=6.1.0 SMP mod_unload \nalias=xen:vbd\nalias=xen-blkfront\nname=xen_blkfront")
    mod = modules.read_module(ko)
    assert (mod.name, mod.release, mod.kinds) == ("xen_blkfront", "6.1.0", ("vbd",))


def test_what_is_not_a_module_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        modules.read_module(tmp_path / "none.ko")
    (tmp_path / "text.ko").write_text("hello")
    with pytest.raises(ConfigError, match=r"text\.ko is not a kernel module \(not an ELF file\)"):
        modules.read_module(tmp_path / "text.ko")
    with pytest.raises(ConfigError, match="no .modinfo section"):
        modules.read_module("/bin/true")
    with pytest.raises(ConfigError, match="has no vermagic"):
        modules.read_module(compiled_module(tmp_path, "bare", "license=GPL"))


def test_a_module_for_another_release_is_refused_naming_both(tmp_path):
    mod = modules.read_module(compiled_module(tmp_path, "m", "vermagic=6.1.99 SMP \nname=m"))
    now = modules.GuestModules("6.1.0", {}, {})
    with pytest.raises(ConfigError, match=r"built for kernel 6\.1\.99, but guest 'g1' runs 6\.1\.0"):
        modules._check_fits(mod, now, "g1")


STATE = """6.1.0
@@
xen_blkfront /lib/modules/stock/xen_blkfront.ko stock
xen_netfront - kept-off
@@
xen_blkfront 49152 0 - Live 0x0000000000000000
xlecho 16384 0 - Live 0x0000000000000000
@@
vbd-51728 vbd xen_blkfront
vif-0 - -
console-0 - -
@@
/dev/xvdb
@@
xen_blkfront.ko
xen_netfront.ko
"""


def test_the_guests_report_is_parsed(monkeypatch):
    class Guests:
        def exec(self, name, script, timeout):
            return type("R", (), {"exit_status": 0, "stdout": STATE, "stderr": ""})()

    now = modules.state(Guests(), "g1")
    assert now.release == "6.1.0"
    assert now.in_use == {"xen_blkfront": {"file": "/lib/modules/stock/xen_blkfront.ko", "origin": "stock"},
                          "xen_netfront": {"file": "-", "origin": "kept-off"}}
    assert set(now.loaded) == {"xen_blkfront", "xlecho"} and now.loaded["xen_blkfront"]["size"] == 49152
    assert now.bound_to("xen_blkfront") == [{"kind": "vbd", "devid": 51728, "driver": "vbd", "module": "xen_blkfront"}]
    assert [d["kind"] for d in now.devices if not d["driver"]] == ["vif", "console"]
    assert now.mounted == ["/dev/xvdb"] and now.stock == ["xen_blkfront", "xen_netfront"]
    with pytest.raises(GuestError, match="has /dev/xvdb mounted"):
        modules._check_unmounted(now, now.bound_to("xen_blkfront"), "g1")


def test_devices_xenlab_cannot_give_back_are_refused():
    now = modules.GuestModules("6.1.0", {}, {}, devices=[{"kind": "xlecho", "devid": 0, "driver": "xlecho", "module": "xlecho"}])
    with pytest.raises(GuestError, match="only vbd and vif"):
        modules._devices_to_unplug(now, "xlecho", "g1")


def test_the_swap_script_puts_the_old_module_back_when_the_new_one_fails():
    script = modules._swap_script("xen_blkfront", "/run/xenlab/modules.d/xen_blkfront-ab.ko", "feature_persistent=0", "ship")
    assert "rmmod xen_blkfront" in script and "insmod /run/xenlab/modules.d/xen_blkfront-ab.ko feature_persistent=0" in script
    assert 'insmod "$old"' in script and "result=old-back" in script
    assert "zcat > /run/xenlab/modules.d/xen_blkfront-ab.ko" in script
    unload = modules._swap_script("xen_blkfront", "", "", "unload")
    assert "insmod" not in unload and "result=unloaded" in unload
    stock = modules._swap_script("xen_blkfront", "/lib/modules/stock/xen_blkfront.ko", "", "stock")
    assert "cat >" not in stock and "rm -f /lib/modules/stock" not in stock and "xen_blkfront.ko stock" in stock


def test_bad_parameters_and_actions_are_refused_before_the_guest_is_touched():
    with pytest.raises(ConfigError, match="name=value"):
        modules.change(None, "g1", "load", path="x.ko", params="a=1; reboot")
    with pytest.raises(ConfigError, match="needs the .ko file"):
        modules.module_command(None, "g1", "reload")
    with pytest.raises(ConfigError, match="needs the module's name"):
        modules.module_command(None, "g1", "unload")


def test_devices_are_attached_again_as_they_were():
    vbd = {"kind": "vbd", "vdev": "xvda", "access": "rw", "script": "/etc/xenlab/hotplug/block",
           "target": "/var/lib/xenlab/guests/g1/xvda.img"}
    assert replug._attach_spec(vbd) == "format=raw,vdev=xvda,access=rw,script=/etc/xenlab/hotplug/block,target=/var/lib/xenlab/guests/g1/xvda.img"
    vif = {"kind": "vif", "mac": "00:16:3e:58:4c:0a", "bridge": "xenbr0", "script": "", "type": "vif_ioemu"}
    assert replug._attach_spec(vif) == "mac=00:16:3e:58:4c:0a,bridge=xenbr0"
    assert replug._attach_spec({**vif, "type": "vif"}).endswith(",type=vif")


def test_the_minimal_kernel_layers_its_frontends_as_modules():
    layered = kernel.fragment_path().read_text() + "\n" + kernel.stock_modules_fragment_path().read_text()
    final = "CONFIG_XEN_BLKDEV_FRONTEND=m\nCONFIG_XEN_NETDEV_FRONTEND=m\nCONFIG_XEN=y\n"
    missing = kernel.missing_options(layered, final)
    assert "CONFIG_XEN_BLKDEV_FRONTEND" not in missing and "CONFIG_XEN_NETDEV_FRONTEND" not in missing
    assert kernel.missing_options(layered, final.replace("FRONTEND=m", "FRONTEND=y")).count("CONFIG_XEN_BLKDEV_FRONTEND") == 1


def test_stock_modules_come_from_the_builds_modules_order(tmp_path):
    build = tmp_path / "build"
    (build / "drivers/block").mkdir(parents=True)
    (build / "drivers/block/xen-blkfront.ko").write_bytes(b"ko")
    (build / "modules.order").write_text("drivers/block/xen-blkfront.ko\n")
    built = kernel.KernelBuild(tmp_path, build, tmp_path / "bzImage", "6.1.0", 0)
    assert kernel.stock_modules(built) == {"xen_blkfront": build / "drivers/block/xen-blkfront.ko"}
    (build / "modules.order").write_text("drivers/net/xen-netfront.o\n")
    with pytest.raises(Exception, match="has no xen-netfront.ko"):
        kernel.stock_modules(built)
