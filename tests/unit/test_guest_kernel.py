"""Unit tests for the guest kernel recipe (no kernel is built here)."""

from pathlib import Path

import pytest

from xenlab.errors import HostError, XenlabError
from xenlab.build import kernel

REQUIRED = """
64BIT PRINTK TTY BLK_DEV_INITRD RD_GZIP BINFMT_ELF BINFMT_SCRIPT PROC_FS SYSFS
DEVTMPFS DEVTMPFS_MOUNT HYPERVISOR_GUEST PARAVIRT XEN XEN_PV
XEN_BLKDEV_FRONTEND XEN_NETDEV_FRONTEND HVC_XEN HVC_XEN_FRONTEND BLOCK NET INET
UNIX PACKET XEN_DEV_EVTCHN XENFS XEN_COMPAT_XENFS XEN_GNTDEV XEN_GRANT_DEV_ALLOC
SMP FUTEX EPOLL SHMEM TMPFS MULTIUSER SIGNALFD TIMERFD EVENTFD AIO FILE_LOCKING
POSIX_TIMERS UNIX98_PTYS NETDEVICES BLK_DEV
""".split()


@pytest.fixture
def recipe(tmp_path, monkeypatch):
    """A fake fragment and tarball; returns the fragment path to edit."""
    fragment = tmp_path / "minimal.config"
    fragment.write_text("CONFIG_XEN=y\n")
    tarball = tmp_path / "linux-source-6.1.tar.xz"
    tarball.write_bytes(b"x" * 100)
    monkeypatch.setattr(kernel, "fragment_path", lambda: fragment)
    monkeypatch.setattr(kernel, "source_tarball", lambda: tarball)
    return fragment


def test_recipe_id_is_stable(recipe):
    assert kernel.recipe_id() == kernel.recipe_id()
    assert len(kernel.recipe_id()) == 16
    int(kernel.recipe_id(), 16)


def test_recipe_id_changes_with_fragment(recipe):
    before = kernel.recipe_id()
    recipe.write_text("CONFIG_XEN=y\nCONFIG_XEN_PV=y\n")
    assert kernel.recipe_id() != before


def test_recipe_id_changes_with_build_version(recipe, monkeypatch):
    before = kernel.recipe_id()
    monkeypatch.setattr(kernel, "BUILD_VERSION", kernel.BUILD_VERSION + "x")
    assert kernel.recipe_id() != before


def test_recipe_id_changes_with_tarball(recipe):
    before = kernel.recipe_id()
    kernel.source_tarball().write_bytes(b"x" * 101)
    assert kernel.recipe_id() != before


def test_source_tarball_picks_newest(tmp_path, monkeypatch):
    for name in ("linux-source-6.1.tar.xz", "linux-source-6.10.tar.xz", "linux-source-6.9.tar.xz"):
        (tmp_path / name).touch()
    monkeypatch.setattr(kernel, "SOURCE_DIR", tmp_path)
    assert kernel.source_tarball().name == "linux-source-6.10.tar.xz"


def test_source_tarball_missing_has_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(kernel, "SOURCE_DIR", tmp_path)
    with pytest.raises(HostError) as err:
        kernel.source_tarball()
    assert "linux-source-6.1" in err.value.hint


def test_fragment_ships_in_the_package():
    assert kernel.fragment_path() == Path(kernel.__file__).resolve().parents[1] / "data/guest-kernel/minimal.config"
    assert kernel.fragment_path().is_file()


@pytest.mark.parametrize("option", REQUIRED)
def test_fragment_enables_required_option(option):
    assert f"\nCONFIG_{option}=y\n" in "\n" + kernel.fragment_path().read_text()


def test_verify_config_accepts_complete_config(tmp_path):
    fragment = tmp_path / "frag"
    fragment.write_text("# why\nCONFIG_XEN=y\nCONFIG_XEN_PV=y\n")
    config = tmp_path / ".config"
    config.write_text("CONFIG_64BIT=y\nCONFIG_XEN=y\nCONFIG_XEN_PV=y\n")
    kernel.verify_config(fragment, config)


def test_verify_config_rejects_dropped_option(tmp_path):
    fragment = tmp_path / "frag"
    fragment.write_text("CONFIG_XEN=y\nCONFIG_XEN_PV=y\nCONFIG_XEN_GNTDEV=y\n")
    config = tmp_path / ".config"
    # olddefconfig output: one dropped, one demoted to a module.
    config.write_text("CONFIG_XEN=y\n# CONFIG_XEN_PV is not set\nCONFIG_XEN_GNTDEV=m\n")
    with pytest.raises(XenlabError) as err:
        kernel.verify_config(fragment, config)
    assert "CONFIG_XEN_PV" in err.value.message
    assert "CONFIG_XEN_GNTDEV" in err.value.message


def test_missing_options_ignores_prefix_matches():
    # CONFIG_XEN_PV=y must not satisfy CONFIG_XEN=y.
    assert kernel.missing_options("CONFIG_XEN=y\n", "CONFIG_XEN_PV=y\n") == ["CONFIG_XEN"]
