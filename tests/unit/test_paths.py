"""State and cache directories are private: dom0's SSH host key (in the image
cache) and the labs' keys (in the state) must not be readable by other users."""

import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from xenlab import paths
from xenlab.doctor import _private_check
from xenlab.errors import LabError
from xenlab.lab import Lab
from xenlab.lab.virt import embed_root_fits


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


def test_atomic_write_leaves_the_whole_file_with_open_s_mode_and_no_temporary(tmp_path):
    import os

    from xenlab.agent.sysutil import atomic_write

    target = tmp_path / "f.json"
    atomic_write(target, "first")
    atomic_write(target, b"second")
    assert target.read_text() == "second" and os.listdir(tmp_path) == ["f.json"]
    old = os.umask(0o027)
    try:
        atomic_write(target, "x")
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o640
    atomic_write(target, "y", mode=0o600)
    assert target.stat().st_mode & 0o777 == 0o600


def test_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    import os

    import pytest

    from xenlab.agent.sysutil import atomic_write

    target = tmp_path / "f"
    target.write_text("old")
    with pytest.raises(TypeError):
        atomic_write(target, 12345)  # type: ignore[arg-type]
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f"]


def test_pid_alive_is_false_for_a_zombie_and_true_for_this_process():
    import os
    import subprocess
    import time

    from xenlab.agent.sysutil import pid_alive

    assert pid_alive(os.getpid())
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[-1].split()[0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not pid_alive(child.pid)  # exited, not yet reaped
    child.wait()
    assert not pid_alive(child.pid)


def test_pid_alive_is_false_for_a_process_reaped_between_the_signal_and_proc(monkeypatch):
    # The race a detach hit: kill(pid, 0) still succeeded, then /proc/PID was gone.
    import os

    from xenlab.agent import sysutil

    monkeypatch.setattr(sysutil.os, "kill", lambda pid, sig: None)
    assert sysutil.pid_alive(2**22 + 12345) is False  # above pid_max's default: no /proc entry
    assert os.path.exists("/proc/self")
