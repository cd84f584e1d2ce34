from xenlab.lab import versions


def test_qemu_before_8_0_is_flagged():
    assert versions.qemu_too_old("7.2.22") and not versions.qemu_too_old("8.0.0") and not versions.qemu_too_old("10.0.2")
    assert not versions.qemu_too_old("")  # unknown: doctor says QEMU is missing instead


def test_versions_are_read_from_the_host():
    found = versions.versions()
    assert found["qemu"].count(".") >= 1 and found["libvirt"].count(".") == 2
