"""An example driver test module written with the xenlab pytest plugin.

Run it (the plugin is loaded by installing xenlab; no conftest needed):

    pytest examples/test_example_driver.py --xenlab-name mylab

The first test that needs the lab boots it (about 20 s under TCG, a few
under KVM) and the session stops it at the end; --xenlab-keep leaves it up,
and a lab already up under that name is reused and left running. When a test
fails, the lab's serial log, `xl dmesg`, the guest consoles and a XenStore
dump land in xenlab-artifacts/<test>/ and the report names the folder."""

from __future__ import annotations

import hashlib

import pytest

from xenlab.xenstore.layout import check_domain

# Every test here needs the lab (a marker is enough when no fixture is named).
pytestmark = pytest.mark.xenlab

VBD_XVDA = 51712  # the XenBus device id of xvda (202 << 8)


def test_backends_are_loaded_in_dom0(xenlab_dom0):
    modules = xenlab_dom0.check("cut -d' ' -f1 /proc/modules")
    assert {"xen_blkback", "xen_netback", "xen_gntdev", "xen_evtchn"} <= set(modules.split())


def test_frontend_write_arrives_in_the_backing_file(xenlab_guest_factory, xenlab_dom0):
    """Destructive: the guest writes through blkfront; dom0 reads its backing file."""
    guest = xenlab_guest_factory(disks=["16M"])
    block = b"driver-test\n" * 341 + b"\0" * 4  # one 4 KiB block
    written = guest.exec("dd of=/dev/xvda bs=4096 seek=10 count=1 conv=fsync 2>/dev/null && sync", input=block)
    assert written.ok, written.stderr
    backing = f"/var/lib/xenlab/guests/{guest.name}/xvda.img"
    seen = xenlab_dom0.check(f"dd if={backing} bs=4096 skip=10 count=1 2>/dev/null | sha256sum").split()[0]
    assert seen == hashlib.sha256(block).hexdigest()


def test_xenbus_handshake_completed(xenlab_guest_factory, xenlab_dom0):
    guest = xenlab_guest_factory(disks=["8M"], net=True)
    xs = xenlab_dom0.xs
    assert xs.read(f"/local/domain/{guest.domid}/device/vbd/{VBD_XVDA}/state") == "4"  # XenbusStateConnected
    layouts = check_domain(xs, guest.domid)
    assert {(d.kind, d.devid) for d in layouts} == {("vbd", str(VBD_XVDA)), ("vif", "0")}
    assert all(d.ok for d in layouts), [p for d in layouts for p in d.problems]


def test_ship_and_run_a_userspace_backend(xenlab_dom0, tmp_path):
    """Your own code goes into dom0 with put(); here a tiny script that lists
    the event channels dom0 holds (xen-utils' lsevtchn)."""
    script = tmp_path / "probe.sh"
    script.write_text("#!/bin/sh\n/usr/lib/xen-4.17/bin/lsevtchn 0 | wc -l\n")
    xenlab_dom0.put(script, "/tmp/probe.sh", mode=0o755)
    assert int(xenlab_dom0.check("/tmp/probe.sh")) > 0
