"""Guest spec validation, rendered guest files, the I/O check pattern and
the agent tarball (no VM)."""

import io
import subprocess
import tarfile

import pytest

from xenlab import deploy, templates
from xenlab.agent import facts, iocheck
from xenlab.build import rootfs
from xenlab.errors import ConfigError
from xenlab.guest.manager import pick_address, render_xl_config
from xenlab.guest.spec import DiskSpec, GuestSpec, check_type_on_lab


def test_disk_spec_parse():
    assert DiskSpec.parse("64M") == DiskSpec(64, False)
    assert DiskSpec.parse("1G:ro") == DiskSpec(1024, True)
    assert DiskSpec.parse("16M:rw") == DiskSpec(16, False)
    for bad in ("0M", "-1M", "12Q", "16M:rx", "2000000G"):
        with pytest.raises(ConfigError):
            DiskSpec.parse(bad)


@pytest.mark.parametrize("name", ["with space", "semi;colon", "$(reboot)", "UPPER", "", "a" * 40, "../x"])
def test_guest_name_refused(name):
    with pytest.raises(ConfigError, match="invalid guest name"):
        GuestSpec(name=name).validate()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"memory": 0}, "memory 0 MiB is out of range"),
        ({"memory": 10**6}, "out of range"),
        ({"memory": 64, "root": "python"}, "python guest needs 96"),
        ({"vcpus": 0}, "vcpus 0"),
        ({"type": "pvm"}, "unknown guest type 'pvm'"),
        ({"type": "hvm"}, "minimal kernel boots only as a PV guest .it has no CONFIG_XEN_PVHVM_GUEST"),
        ({"type": "pvh"}, "minimal kernel boots only as a PV guest"),
        ({"kernel": "custom"}, "unknown --kernel"),
        ({"disks": (DiskSpec(1),) * 9}, "at most 8"),
        ({"extra": 'a"b'}, "quotes"),
        ({"hotplug": "udev"}, "unknown --hotplug"),
    ],
)
def test_guest_spec_refusals(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        GuestSpec(name="g1", **kwargs).validate()


def test_up_timeout_defaults_by_guest_type_unless_given():
    """An HVM guest boots SeaBIOS and a Debian kernel under nested TCG: it gets
    longer than a PV guest to be up, and a timeout asked for is kept."""
    waits = {t: GuestSpec(name="g1", type=t, kernel="debian").timeout for t in ("pv", "pvh", "hvm")}
    assert waits["pv"] < waits["pvh"] < waits["hvm"]
    assert waits["hvm"] >= 300  # 83 s to ready measured on a quiet host; slow hosts take 1.5-2x
    assert GuestSpec(name="g1", type="hvm", kernel="debian", timeout=30).timeout == 30
    with pytest.raises(ConfigError, match="timeout must be positive"):
        GuestSpec(name="g1", timeout=0).validate()


def test_xl_config_rendering():
    spec = GuestSpec(name="g1", memory=96, vcpus=2, disks=(DiskSpec(16), DiskSpec(8, True)), net=True).validate()
    text = render_xl_config(spec, "/k/vmlinux", "/k/root.cpio.gz", "10.99.0.12", "00:16:3e:58:4c:0c")
    assert 'name = "g1"' in text and 'type = "pv"' in text and "memory = 96" in text and "vcpus = 2" in text
    assert 'kernel = "/k/vmlinux"' in text and 'ramdisk = "/k/root.cpio.gz"' in text
    assert "xenlab.ip=10.99.0.12/24" in text and "console=hvc0" in text
    assert f"vdev=xvda,access=rw,script={facts.HOTPLUG_DIR}/block,target=/var/lib/xenlab/guests/g1/xvda.img" in text
    assert "vdev=xvdb,access=ro," in text
    assert f'"mac=00:16:3e:58:4c:0c,bridge=xenbr0,script={facts.HOTPLUG_DIR}/vif"' in text
    stock = render_xl_config(GuestSpec(name="g2", disks=(DiskSpec(16),), hotplug="stock"), "/k", "/r", "10.99.0.10", "m")
    assert "script=" not in stock and 'vif = [\n]' in stock
    assert "pci=noearly" not in text
    hvm = render_xl_config(GuestSpec(name="h1", type="hvm", kernel="debian", extra="foo=1"), "/k", "/r", "10.99.0.10", "m")
    assert 'cmdline = "console=hvc0 quiet loglevel=1 pci=noearly xenlab.name=h1 xenlab.ip=10.99.0.10/24 foo=1"' in hvm


def test_pick_address_lowest_free():
    assert pick_address(set()) == ("10.99.0.10", "00:16:3e:58:4c:0a")
    assert pick_address({"10.99.0.10", "10.99.0.11"})[0] == "10.99.0.12"


def test_pattern_records_name_their_offset():
    data = iocheck.pattern("domU", 4096, 96)
    assert len(data) == 96
    assert data[:32] == b"domU    0000000000004096" + b"0000000\n"
    assert data[64:96] == b"domU    0000000000004160" + b"0000002\n"
    assert set(data) - set(b"\x00")  # never all zeros


def test_pattern_matches_busybox_awk():
    """The guest generates the same bytes with busybox awk (offsets past 2**31 included)."""
    busybox = "/bin/busybox"
    for off, length in ((0, 4096), (8400896, 4096), (3 << 31, 4096), (4096, 4096 * 3 + 32 * 5)):
        cmd = iocheck.awk_pattern_cmd("dom0", off, length).replace("awk ", f"{busybox} awk ", 1)
        out = subprocess.run(["sh", "-c", cmd], capture_output=True, check=True).stdout
        assert out == iocheck.pattern("dom0", off, length)


def test_chunks_spread_and_fit():
    size = 16 << 20
    places = iocheck.chunks(size)
    assert places[0][0] == 0 and places[-1][0] + places[-1][1] == size
    assert all(off % iocheck.BLOCK == 0 and n % iocheck.BLOCK == 0 for off, n in places)
    assert sum(n for _, n in places) == 4 << 20
    small = iocheck.chunks(1 << 20)
    assert all(off + n <= 1 << 20 for off, n in small)


def test_io_size_is_the_largest_power_of_two_dividing_the_chunk():
    assert iocheck.io_size(0, 1 << 20) == iocheck.MAX_IO
    assert iocheck.io_size(8 << 20, 3 * (64 << 10)) == 64 << 10
    assert iocheck.io_size((8 << 20) + 3 * iocheck.BLOCK, 2 << 20) == iocheck.BLOCK
    for off, n in iocheck.chunks(64 << 20):
        bs = iocheck.io_size(off, n)
        assert off % bs == 0 and n % bs == 0


def test_first_difference():
    assert iocheck.first_difference(b"abc", b"abc") is None
    assert iocheck.first_difference(b"abc", b"abd") == 2
    assert iocheck.first_difference(b"ab", b"abc") == 2


def test_domu_init_rendering():
    text = templates.render("domu-init.sh.j2", python=True, modules=["xen_blkfront", "xen_netfront"], **rootfs.init_facts())
    assert 'stock="xen_blkfront xen_netfront"' in text and f"load \"$mod\" {rootfs.STOCK_MODULE_DIR}/$mod.ko stock" in text
    assert "xenlab.no_stock=*" in text and "PYTHONHOME=/usr" in text
    assert "XENLAB-GUEST-READY" in text and "stty -F /dev/hvc0 raw -echo" in text
    plain = templates.render("domu-init.sh.j2", python=False, modules=[], **rootfs.init_facts())
    assert 'stock=""' in plain and "PYTHONHOME" not in plain
    assert "/etc/xenlab/load" in plain  # the user's modules, whatever the root
    for script in (text, templates.render("domu-exec-agent.sh.j2", **rootfs.exec_facts())):
        subprocess.run(["sh", "-n"], input=script.encode(), check=True)


def test_hotplug_scripts_parse():
    scripts = deploy.hotplug_scripts()
    assert set(scripts) == {"block", "vif"}
    assert "losetup -f --show" in scripts["block"] and "physical-device" in scripts["block"]
    assert "master" in scripts["vif"] and "hotplug-status" in scripts["vif"]
    for text in scripts.values():
        subprocess.run(["sh", "-n"], input=text.encode(), check=True)


def test_agent_tarball_layout():
    with tarfile.open(fileobj=io.BytesIO(deploy.agent_tarball())) as tar:
        names = tar.getnames()
        assert "xenlab_agent/__init__.py" in names and "xenlab_agent/domctl.py" in names
        assert tar.extractfile("xenlab_agent/VERSION").read().decode() == deploy.agent_version()
        assert tar.getmember("hotplug/block").mode == 0o755
    assert deploy.agent_command("domctl", "list") == "PYTHONPATH=/usr/local/lib/xenlab python3 -m xenlab_agent.domctl list"


def test_streamed_exec_frames_go_through_as_they_come():
    import base64
    import io

    from xenlab.guest.manager import _OutputFrames

    out, err = io.BytesIO(), io.BytesIO()
    frames = _OutputFrames(out, err)
    stream = (b"O " + base64.b64encode(b"first\n") + b"\nE " + base64.b64encode(b"\0\377 oops") + b"\n"
              + b"O " + base64.b64encode(b"second") + b"\n" + b'{"rc": 7}')
    frames.write(stream[:5])  # a frame cut in two arrives whole
    assert out.getvalue() == b""
    frames.write(stream[5:30])
    assert out.getvalue() == b"first\n"
    frames.write(stream[30:])
    assert out.getvalue() == b"first\nsecond" and err.getvalue() == b"\0\377 oops"
    assert frames.rest() == '{"rc": 7}'


@pytest.mark.parametrize(
    "accel,cpu,xen,qemu,message",
    [
        ("tcg", "qemu64", "4.20", "10.0.2", "needs a CPU model with SVM"),
        ("tcg", "svm", "4.17.7", "10.0.2", "cannot run on Xen 4.17.7 under QEMU 10.0.2"),
        ("tcg", "svm", "4.17", "9.1.0", "cannot run on Xen 4.17 under QEMU 9.1.0"),
    ],
)
def test_pvh_refused_on_a_lab_that_cannot_run_it(accel, cpu, xen, qemu, message):
    with pytest.raises(ConfigError, match=message) as e:
        check_type_on_lab("pvh", accel, cpu, xen, qemu_version=qemu)
    if "QEMU" in message:
        assert "--qemu stock" in e.value.hint and "--suite trixie" in e.value.hint


@pytest.mark.parametrize("xen,qemu", [("4.17.7", "7.2.22"), ("4.17.7", "9.0.2"), ("4.20.5-pre", "10.0.2"),
                                      ("4.17.7", None), (None, "10.0.2")])
def test_pvh_and_hvm_run_where_xen_reads_cr2_right(xen, qemu):
    """QEMU before 9.1 reports CR reads right; Xen 4.20 syncs CR2; None: not known, left to Xen."""
    for guest_type in ("pvh", "hvm"):
        check_type_on_lab(guest_type, "tcg", "svm", xen, qemu_version=qemu)


def test_hvm_needs_svm_and_a_working_xen_qemu_pair_under_tcg():
    with pytest.raises(ConfigError, match="an HVM guest needs a CPU model with SVM"):
        check_type_on_lab("hvm", "tcg", "qemu64", "4.20")
    with pytest.raises(ConfigError, match="HVM guests cannot run on Xen 4.17"):
        check_type_on_lab("hvm", "tcg", "svm", "4.17", qemu_version="10.0.2")
    check_type_on_lab("hvm", "tcg", "svm", "4.20", qemu_version="10.0.2")


@pytest.mark.parametrize("guest_type", ["pvh", "hvm"])
def test_pvh_and_hvm_under_tcg_need_a_one_vcpu_lab(guest_type):
    with pytest.raises(ConfigError, match=f"{guest_type.upper()} guests under TCG need a lab with one vCPU; this lab has 2") as e:
        check_type_on_lab(guest_type, "tcg", "svm", "4.20", vcpus=2)
    assert "xenlab up --vcpus 1" in e.value.hint
    check_type_on_lab(guest_type, "kvm", "svm", "4.20", vcpus=4)  # the hardware's SVM, not QEMU's
    check_type_on_lab("pv", "tcg", "svm", "4.17", vcpus=2)


def test_guest_type_checked_from_the_config_before_a_boot():
    from xenlab import config as config_mod
    from xenlab.guest.spec import check_type_for_config

    two = config_mod.load(None, {"accel": "tcg", "dom0.suite": "trixie"})
    with pytest.raises(ConfigError, match="one vCPU"):
        check_type_for_config("pvh", two, None)
    one_old = config_mod.load(None, {"accel": "tcg", "vcpus": 1})
    assert one_old.dom0.vcpus == 1  # `--vcpus 1` alone: dom0 follows
    with pytest.raises(ConfigError, match="Xen 4.17"):
        check_type_for_config("hvm", one_old, {"accel": "tcg", "versions": {"qemu": "10.0.2"}})
    check_type_for_config("hvm", one_old, {"accel": "tcg", "versions": {"qemu": "7.2.22"}})
    check_type_for_config("hvm", config_mod.load(None, {"accel": "tcg", "vcpus": 1, "dom0.suite": "trixie"}), None)
    check_type_for_config("pvh", two, {"accel": "kvm"})  # a running lab: its accelerator decides


def test_disk_names_by_guest_type():
    disks = tuple(DiskSpec.parse(d) for d in ("16M", "8M:ro", "4M"))
    assert GuestSpec(name="g", disks=disks).vdevs() == ["xvda", "xvdb", "xvdc"]
    # HVM: past the IDE slots libxl would emulate, so PV only.
    assert GuestSpec(name="g", disks=disks, type="hvm", kernel="debian").vdevs() == ["xvde", "xvdf", "xvdg"]


def test_a_roots_older_builds_are_pruned_but_not_another_images(tmp_path):
    # A bookworm and a trixie lab run side by side (CI does): building one's
    # root must not remove the other's from under its guest create.
    from xenlab.build.dom0 import Dom0Image

    images, cache = tmp_path / "images", tmp_path / "guest"
    for name in ("dom0-bookworm-0fea8eae67de", "dom0-trixie-4df02f65712f"):
        (images / name).mkdir(parents=True)
    cache.mkdir()
    names = {
        "current": "domu-python-debian-dom0-bookworm-0fea8eae67de-111111111111.cpio.gz",
        "older": "domu-python-debian-dom0-bookworm-0fea8eae67de-000000000000.cpio.gz",
        "other_image": "domu-python-debian-dom0-trixie-4df02f65712f-222222222222.cpio.gz",
        "gone_image": "domu-python-debian-dom0-bookworm-ffffffffffff-333333333333.cpio.gz",
        "old_layout": "domu-python-debian-863d3f0a80d7.cpio.gz",
        "other_root": "domu-busybox-debian-dom0-bookworm-0fea8eae67de-444444444444.cpio.gz",
    }
    for name in names.values():
        (cache / name).write_bytes(b"x")
    rootfs._prune(cache, Dom0Image(images / "dom0-bookworm-0fea8eae67de"), cache / names["current"], "domu-python-debian-")
    assert sorted(p.name for p in cache.iterdir()) == sorted([names["current"], names["other_image"], names["other_root"]])


def test_a_guest_write_that_did_not_land_is_written_again_to_say_where(tmp_path):
    """The block check's logic with a stand-in guest: its data never reaches the
    backing file (the real check runs in tests/e2e/test_guest.py)."""
    backing = tmp_path / "xvda.img"
    backing.write_bytes(b"\0" * (1 << 20))
    check = iocheck.Check("g1")
    scripts = []

    def guest(script, timeout=300):
        scripts.append(script)
        if "sha256sum /tmp/blk" in script:  # "wrote" random data: says hashes of data that never landed
            return 0, "\n".join(f"{'ab' * 32}  /tmp/blk" for _ in iocheck.chunks(1 << 20)) + "\n", ""
        return 0, "", ""

    check.guest = guest
    check.block({"vdev": "xvda", "path": str(backing), "size_mib": 1})
    written = check.results[0]
    assert not written["ok"] and "offset 0: got b'\\x00" in written["detail"] and "3 of 3 places differ" in written["detail"]
    assert "awk" in scripts[1] and "seek=0" in scripts[1]  # the first bad place, written again as records naming their offsets
