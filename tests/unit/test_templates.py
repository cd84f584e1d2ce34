import xml.etree.ElementTree as ET
from pathlib import Path

import jinja2
import pytest

from xenlab import config, templates
from xenlab.agent.facts import XEN_BIN
from xenlab.build import dom0 as images
from xenlab.lab import Lab

QEMU_NS = "{http://libvirt.org/schemas/domain/qemu/1.0}"


@pytest.fixture
def lab(tmp_path, monkeypatch):
    monkeypatch.setenv("XENLAB_STATE", str(tmp_path / "state"))
    lab = Lab(config.load(overrides={"name": "unit"}))
    lab.dir.mkdir(parents=True)
    lab.key_file.with_suffix(".pub").write_text("ssh-ed25519 AAAAKEY xenlab\n")
    return lab


def render_domain(lab, accel="tcg", cpu=None):
    if cpu:
        lab.cfg = config.load(overrides={"name": "unit", "cpu": cpu})
    image = images.Dom0Image(Path("/cache/dom0-x"))
    return ET.fromstring(lab.domain_xml(image, accel, 2222))


def qemu_args(root):
    return [a.get("value") for a in root.find(f"{QEMU_NS}commandline")]


def test_domain_xml_tcg_svm_is_qemu64_with_amd_v_and_nested_paging(lab):
    root = render_domain(lab)
    assert {(f.get("name"), f.get("policy")) for f in root.findall("cpu/feature")} == {("svm", "require"), ("npt", "require")}
    assert root.get("type") == "qemu"
    assert root.find("name").text == "xenlab-unit"
    assert root.find("features/acpi") is not None and root.find("features/apic") is not None
    assert root.find("cpu/model").text == "qemu64"
    assert root.find("memory").text == "2048"
    assert root.find("devices/serial/source").get("path").endswith("labs/unit/serial.log")
    args = qemu_args(root)
    assert args[args.index("-kernel") + 1] == "/cache/dom0-x/xen"
    netdev = args[args.index("-netdev") + 1]
    assert "restrict=on" in netdev and "hostfwd=tcp:127.0.0.1:2222-:22" in netdev
    assert "addr=0x9" in args[args.index("-device") + 1]
    append = args[args.index("-append") + 1]
    assert "dom0_mem=1024M,max:1024M" in append and "bootscrub=false" in append and "conring_size=4M" in append


def test_domain_xml_modules_escape_commas(lab):
    args = qemu_args(render_domain(lab))
    modules = args[args.index("-initrd") + 1]
    kernel, initramfs = modules.split(",/")
    assert kernel.startswith("/cache/dom0-x/vmlinux root=/dev/vda")
    assert "xenlab.authkey=AAAAKEY" in kernel and initramfs == "cache/dom0-x/initramfs.cpio"


def test_domain_xml_max_cpu_disables_smap(lab):
    root = render_domain(lab, cpu="max")
    assert root.find("cpu").get("mode") == "maximum"
    disabled = {f.get("name") for f in root.findall("cpu/feature") if f.get("policy") == "disable"}
    assert disabled == {"smap", "smep"}


def test_domain_xml_kvm(lab):
    root = render_domain(lab, accel="kvm")
    assert root.get("type") == "kvm" and root.find("cpu").get("mode") == "host-passthrough"


def render_init():
    return templates.render(
        "dom0-init.sh.j2", xen_bin=images.XEN_BIN, hostname="h", modules=images.DOM0_MODULES,
        xen_devices=images.XEN_DEVICES, **images.NETWORK,
    )


def test_dom0_init_script():
    text = render_init()
    assert text.startswith("#!/bin/sh\n")
    assert "modprobe -a xenfs xen-evtchn" in text and "xen-gntalloc" in text
    assert f"XENSTORED_ROOTDIR=/run/xenstored {XEN_BIN}/xenstored" in text
    assert text.rstrip().endswith('step "XENLAB-READY"')
    # The bridge for domUs must have no uplink: nothing enslaves eth0.
    assert "master" not in text


def test_initramfs_init_lists_modules_in_order():
    text = templates.render("initramfs-init.sh.j2", modules=["virtio_ring", "virtio", "ext4"], root_device="/dev/vda", carry=False)
    assert "for m in virtio_ring virtio ext4; do" in text
    assert "switch_root /newroot /bin/busybox init" in text
    assert "/carry" not in text
    # A dom0 kernel of the user's brings its modules into the root before switch_root.
    carried = templates.render("initramfs-init.sh.j2", modules=[], root_device="/dev/vda", carry=True)
    assert carried.index("cp -a /carry/. /newroot/lib/modules/") < carried.index("switch_root")


def test_inittab():
    assert templates.render("inittab.j2", init_script="/x").startswith("# busybox init")


def test_strict_undefined():
    with pytest.raises(jinja2.UndefinedError):
        templates.render("inittab.j2")


def test_extra_xen_and_dom0_args(lab):
    lab.cfg = config.load(overrides={"name": "unit", "xen_args": "sched=credit", "dom0.kernel_args": "ignore_loglevel"})
    args = qemu_args(render_domain(lab))
    assert args[args.index("-append") + 1].endswith(" sched=credit")
    assert args[args.index("-initrd") + 1].split(",/")[0].endswith(" ignore_loglevel")


def test_domain_xml_of_a_remote_lab_names_only_remote_paths(lab):
    """A lab on another libvirt host: its files where they were uploaded there, that host's own QEMU."""
    pool = "/home/r/.local/share/xenlab/pool"
    placed = {"xen": f"{pool}/boot-xen", "dom0_kernel": f"{pool}/img-vmlinux", "initramfs": f"{pool}/img-initramfs.cpio",
              "disk": f"{pool}/lab-unit.qcow2", "serial_log": f"{pool}/lab-unit-serial.log"}
    image = images.Dom0Image(Path("/cache/dom0-x"))
    root = ET.fromstring(lab.domain_xml(image, "tcg", 2222, placed=placed))
    assert root.find("devices/emulator") is None
    assert root.find("devices/disk/source").get("file") == placed["disk"]
    assert root.find("devices/serial/source").get("path") == placed["serial_log"]
    args = qemu_args(root)
    assert args[args.index("-kernel") + 1] == placed["xen"]
    assert args[args.index("-initrd") + 1].startswith(placed["dom0_kernel"] + " ") and args[args.index("-initrd") + 1].endswith("," + placed["initramfs"])
    assert "hostfwd=tcp:127.0.0.1:2222-:22" in args[args.index("-netdev") + 1]  # the remote host's loopback
    assert "/cache/" not in ET.tostring(root, encoding="unicode")
