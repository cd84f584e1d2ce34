"""Unit tests for the guest kernel recipe (no kernel is built here)."""

from pathlib import Path

import pytest

from xenlab.build import kernel
from xenlab.errors import HostError, XenlabError

REQUIRED = """
64BIT PRINTK TTY BLK_DEV_INITRD RD_GZIP BINFMT_ELF BINFMT_SCRIPT PROC_FS SYSFS
DEVTMPFS DEVTMPFS_MOUNT HYPERVISOR_GUEST PARAVIRT XEN XEN_PV
XEN_BLKDEV_FRONTEND XEN_NETDEV_FRONTEND HVC_XEN HVC_XEN_FRONTEND BLOCK NET INET
UNIX PACKET XEN_DEV_EVTCHN XENFS XEN_COMPAT_XENFS XEN_GNTDEV XEN_GRANT_DEV_ALLOC
SMP FUTEX EPOLL SHMEM TMPFS MULTIUSER SIGNALFD TIMERFD EVENTFD AIO FILE_LOCKING
POSIX_TIMERS UNIX98_PTYS NETDEVICES BLK_DEV
""".split()


REQUIRED += ["MODULES", "MODULE_UNLOAD"]  # out-of-tree drivers load into the minimal kernel


def fake_tree(root: Path) -> Path:
    for rel in ("Makefile", "Kconfig", "arch/x86/Kconfig", "drivers/xen/a.c", ".git/HEAD"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    return root


@pytest.fixture
def fake_make(monkeypatch, tmp_path):
    """Stand-ins for configure and compile that record what ran and leave what kbuild leaves."""
    calls = []

    def configure(tree, out, fragments, log_file):
        calls.append("configure")
        out.mkdir(parents=True, exist_ok=True)
        (out / ".config").write_text("".join(f.read_text() for f in fragments))

    def compile_(tree, out, log_file, steps):
        calls.append("compile")
        (out / "arch/x86/boot").mkdir(parents=True, exist_ok=True)
        (out / "arch/x86/boot/bzImage").write_bytes(b"bz" + (tree / "drivers/xen/a.c").read_bytes())
        (out / "include/config").mkdir(parents=True, exist_ok=True)
        (out / "include/config/kernel.release").write_text("6.1.99\n")
        return 3

    monkeypatch.setattr(kernel, "_configure", configure)
    monkeypatch.setattr(kernel, "_compile", compile_)
    fragment = tmp_path / "minimal.config"
    fragment.write_text("CONFIG_XEN=y\n")
    monkeypatch.setattr(kernel, "fragment_path", lambda: fragment)
    return calls


def test_tree_builds_are_cached_by_content_and_incremental(tmp_path, fake_make):
    tree, cache = fake_tree(tmp_path / "linux"), tmp_path / "cache"
    first = kernel.build_tree(tree, cache)
    assert fake_make == ["configure", "compile"] and first.compiled == 3 and first.release == "6.1.99"
    assert first.bzimage.read_bytes() == b"bzdrivers/xen/a.c"
    again = kernel.build_tree(tree, cache)
    assert fake_make == ["configure", "compile"] and again.compiled == 0 and again.build_dir == first.build_dir  # unchanged: nothing ran
    (tree / ".git/HEAD").write_text("another commit")  # not the tree's content
    assert kernel.build_tree(tree, cache).compiled == 0
    (tree / "drivers/xen/a.c").write_text("changed")
    changed = kernel.build_tree(tree, cache)
    assert fake_make == ["configure", "compile", "compile"] and changed.bzimage.read_bytes() == b"bzchanged"  # incremental: no reconfigure
    fragment = kernel.fragment_path()
    fragment.write_text("# a reworded comment\n" + fragment.read_text())
    assert kernel.build_tree(tree, cache).build_dir == first.build_dir  # comments are no new kernel
    mine = tmp_path / "mine.config"
    mine.write_text("CONFIG_FOO=y\n")
    other = kernel.build_tree(tree, cache, config=mine)
    assert other.build_dir != first.build_dir and fake_make[-2:] == ["configure", "compile"]
    assert "CONFIG_FOO=y" in (other.build_dir / ".config").read_text()


def test_a_failed_build_leaves_no_usable_entry(tmp_path, fake_make, monkeypatch):
    tree, cache = fake_tree(tmp_path / "linux"), tmp_path / "cache"
    built = kernel.build_tree(tree, cache)
    (tree / "drivers/xen/a.c").write_text("broken")

    def fail(*args):
        raise XenlabError("command failed with exit code 2: make ... error: expected ';'")

    monkeypatch.setattr(kernel, "_compile", fail)
    with pytest.raises(XenlabError, match="expected ';'"):
        kernel.build_tree(tree, cache)
    assert not (built.bzimage.parent / "stamp.json").exists()
    # Even with the old content back, the unfinished build is not taken as done.
    (tree / "drivers/xen/a.c").write_text("drivers/xen/a.c")
    with pytest.raises(XenlabError):
        kernel.build_tree(tree, cache)


def test_trees_that_cannot_be_built_out_of_tree_are_refused(tmp_path):
    with pytest.raises(XenlabError, match="is not a Linux source tree"):
        kernel.check_tree(tmp_path)
    tree = fake_tree(tmp_path / "linux")
    (tree / ".config").write_text("CONFIG_X=y\n")
    with pytest.raises(XenlabError, match="mrproper"):
        kernel.check_tree(tree)
    with pytest.raises(XenlabError, match="no such file"):
        (tree / ".config").unlink() or kernel.build_tree(tree, tmp_path / "cache", config=tmp_path / "none.config")


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


def test_earlier_minimal_kernels_are_pruned_not_other_trees(tmp_path, fake_make):
    tree, cache = fake_tree(tmp_path / "linux"), tmp_path / "cache"
    stock = tmp_path / "stock.config"
    stock.write_text("CONFIG_XEN_BLKDEV_FRONTEND=m\n")
    old = kernel.build_tree(tree, cache, layers=(stock,), minimal=True)
    kernel.fragment_path().write_text("CONFIG_XEN=y\nCONFIG_MODULES=y\n")  # the fragment changed: a new kernel
    mine = tmp_path / "mine.config"
    mine.write_text("CONFIG_FOO=y\n")
    users = kernel.build_tree(tree, cache, config=mine)
    plain = kernel.build_tree(tree, cache)  # `--kernel-tree` of the minimal kernel's own tree, no config: the user's too
    (cache / "guest-kernel-0123").mkdir()
    new = kernel.build_tree(tree, cache, layers=(stock,), minimal=True)
    kernel._prune_minimal(cache, new)
    assert new.bzimage.exists() and users.bzimage.exists() and not old.bzimage.parent.exists()
    assert plain.bzimage.exists()
    assert not (cache / "guest-kernel-0123").exists()
