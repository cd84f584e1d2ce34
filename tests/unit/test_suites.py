"""Building a dom0 from another Debian suite than the host's: the apt
sources rewritten for it, and the compressed kernel files trixie ships."""

from __future__ import annotations

import lzma
import subprocess

import pytest

from xenlab.agent.facts import XEN_VERSIONS
from xenlab.build import dom0, initramfs
from xenlab.config import SUITES, LabConfig
from xenlab.errors import ConfigError

DEB822 = """Types: deb
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""


def test_sources_rewritten_for_another_suite(tmp_path, monkeypatch):
    host = tmp_path / "debian.sources"
    host.write_text(DEB822)
    monkeypatch.setattr(dom0, "host_codename", lambda: "bookworm")
    out = dom0.suite_sources(host, "trixie", tmp_path / "apt.sources")
    assert out != host
    text = out.read_text()
    assert "Suites: trixie trixie-updates\n" in text and "Suites: trixie-security\n" in text and "bookworm" not in text
    assert "URIs: http://mirror.example/debian-security" in text  # mirrors kept as the host has them


def test_one_line_sources_rewritten(tmp_path, monkeypatch):
    host = tmp_path / "sources.list"
    host.write_text("deb http://mirror.example/debian bookworm main\ndeb http://mirror.example/debian-security bookworm-security main\n")
    monkeypatch.setattr(dom0, "host_codename", lambda: "bookworm")
    text = dom0.suite_sources(host, "trixie", tmp_path / "apt.sources").read_text()
    assert text == "deb http://mirror.example/debian trixie main\ndeb http://mirror.example/debian-security trixie-security main\n"


def test_host_suite_uses_the_host_file(tmp_path, monkeypatch):
    host = tmp_path / "debian.sources"
    host.write_text(DEB822)
    monkeypatch.setattr(dom0, "host_codename", lambda: "bookworm")
    assert dom0.suite_sources(host, "bookworm", tmp_path / "apt.sources") == host
    assert not (tmp_path / "apt.sources").exists()


def test_each_suite_names_its_xen_packages():
    assert SUITES == tuple(XEN_VERSIONS)
    for suite, version in XEN_VERSIONS.items():
        packages = dom0.dom0_packages(LabConfig.from_dict({"dom0": {"suite": suite, "extra_packages": ["strace"]}}))
        assert f"xen-hypervisor-{version}-amd64" in packages and f"xen-utils-{version}" in packages and "strace" in packages
    assert dom0.recipe_id(LabConfig.from_dict({"dom0": {"suite": "trixie"}})).startswith("dom0-trixie-")


def test_unknown_suite_refused():
    with pytest.raises(ConfigError, match="suite 'sid' is not supported"):
        LabConfig.from_dict({"dom0": {"suite": "sid"}})


def test_compressed_modules_made_plain(tmp_path):
    elf = b"\x7fELF" + bytes(range(256)) * 8
    (tmp_path / "a.ko.xz").write_bytes(lzma.compress(elf, format=lzma.FORMAT_XZ))
    (tmp_path / "b.ko").write_bytes(elf)
    (tmp_path / "c.ko.zst").write_bytes(subprocess.run(["zstd", "-q", "-c"], input=elf, capture_output=True, check=True).stdout)
    for name in ("a.ko.xz", "b.ko", "c.ko.zst"):
        assert initramfs.plain_module(tmp_path / name) == elf
