"""State and cache directories are private: dom0's SSH host key (in the image
cache) and the labs' keys (in the state) must not be readable by other users."""

import stat

from xenlab import paths
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
