"""State and cache directories are private: dom0's SSH host key (in the image
cache) and the labs' keys (in the state) must not be readable by other users."""

import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from xenlab import paths
from xenlab.errors import LabError
from xenlab.lab import Lab
from xenlab.lab.virt import embed_root_fits
from xenlab.doctor import _private_check


def mode(p) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_made_private_and_tightened(tmp_path, monkeypatch):
    monkeypatch.setenv("XENLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("XENLAB_STATE", str(tmp_path / "state"))
    assert _private_check().ok  # nothing made yet is fine
    loose = tmp_path / "state"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    check = _private_check()
    assert not check.ok and str(loose) in check.detail and "755" in check.detail
    assert mode(paths.cache_dir()) == 0o700
    assert mode(paths.state_root()) == 0o700 and mode(loose) == 0o700
    assert _private_check().ok


def test_long_lab_paths_get_a_short_embed_root(monkeypatch):
    # libvirt binds ROOT/lib/qemu/domain-ID-NAME/monitor.sock; a UNIX socket
    # path holds 107 bytes, so a deep state directory needs a short alias.
    with tempfile.TemporaryDirectory(dir="/tmp") as base:
        monkeypatch.setenv("XENLAB_STATE", base)
        lab = Lab.open("a")
        assert lab.embed_root == lab.dir / "libvirt"
        lab = Lab.open("ci-qemu-backports-second")
        root = lab.embed_root
        assert not embed_root_fits(lab.dir / "libvirt")
        lab._link_embed_root()
        (root / "cache").mkdir()  # as libvirt does, through the link
        assert root.is_symlink() and root.resolve() == (lab.dir / "libvirt").resolve()
        assert embed_root_fits(root) and lab.embed_root == root  # stable on the next call
        monkeypatch.setenv("XENLAB_STATE", str(Path(base) / ("d" * 60)))
        with pytest.raises(LabError, match="too long for libvirt") as err:
            Lab.open("x")._link_embed_root()
        assert "XENLAB_STATE" in err.value.hint


def test_scratch_of_a_killed_build_is_swept_and_a_live_one_kept(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = paths.work_dir(tmp_path, ".img.")
    (stale / paths.OWNER_FILE).write_text(f"{dead.pid}\n")
    (stale / "rootfs").mkdir()
    live = paths.work_dir(tmp_path, ".img.")
    foreign = tmp_path / ".img.foreign"
    foreign.mkdir()
    said = paths.sweep_stale_work(tmp_path, ".img.")
    assert not stale.exists() and live.exists() and foreign.exists()
    assert said == [f"removed {stale}, left by an interrupted build (pid {dead.pid})"]
