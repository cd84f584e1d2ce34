import pytest

from xenlab import config
from xenlab.errors import ConfigError
from xenlab.lab import versions


def test_qemu_before_8_0_is_flagged():
    assert versions.qemu_too_old("7.2.22") and not versions.qemu_too_old("8.0.0") and not versions.qemu_too_old("10.0.2")
    assert not versions.qemu_too_old("")  # unknown: doctor says QEMU is missing instead


def test_versions_are_read_from_the_host():
    found = versions.versions()
    assert found["qemu"].count(".") >= 1 and found["libvirt"].count(".") == 2


def _install_fake_backports(stacks):
    wrapper = stacks / "qemu-backports" / "qemu-system-x86_64"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text("#!/bin/sh\n")
    wrapper.chmod(0o755)
    return str(wrapper)


def test_default_qemu_is_backports_when_installed(tmp_path, monkeypatch):
    monkeypatch.setenv("XENLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("xenlab.paths.SYSTEM_STACKS", tmp_path / "system")
    assert versions.qemu_binary("") == versions.stock_qemu() and versions.backports_qemu() == ""
    wrapper = _install_fake_backports(tmp_path / "system")
    assert versions.qemu_binary("") == wrapper == versions.qemu_binary("backports")
    assert versions.qemu_binary("stock") == versions.stock_qemu() != wrapper
    assert versions.stack_name(wrapper) == "backports" and versions.stack_name(versions.stock_qemu()) == "stock"
    assert versions.qemu_binary("/some/qemu") == "/some/qemu" and versions.stack_name("/some/qemu") == "own"


def test_user_stack_comes_before_the_system_one(tmp_path, monkeypatch):
    monkeypatch.setenv("XENLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("xenlab.paths.SYSTEM_STACKS", tmp_path / "system")
    _install_fake_backports(tmp_path / "system")
    mine = _install_fake_backports(tmp_path / "cache" / "stacks")
    assert versions.backports_qemu() == mine


def test_backports_named_but_missing_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XENLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("xenlab.paths.SYSTEM_STACKS", tmp_path / "system")
    cfg = tmp_path / "lab.toml"
    cfg.write_text('[lab]\nqemu = "backports"\n')
    with pytest.raises(ConfigError, match="not installed") as e:
        config.load(cfg)
    assert "ci/qemu-backports.sh" in e.value.hint
    cfg.write_text('[lab]\nqemu = "stock"\n')
    assert config.load(cfg).qemu == "stock"
