"""The pytest plugin without a lab: it is loaded through its entry point, its
options and marker exist, it stays inert for tests that do not use it, and
its naming helpers give valid names."""

from __future__ import annotations

import re
from importlib.metadata import entry_points

from xenlab.paths import lab_dir
from xenlab.pytest_plugin import artifacts_dir, guest_name

pytest_plugins = ["pytester"]


def test_entry_point_names_the_plugin():
    (ep,) = [e for e in entry_points(group="pytest11") if e.name == "xenlab"]
    assert ep.value == "xenlab.pytest_plugin"


def test_options_and_marker_are_registered(pytester):
    result = pytester.runpytest_subprocess("--help")
    out = result.stdout.str()
    for option in ("--xenlab-name", "--xenlab-keep", "--xenlab-connect", "--xenlab-artifacts", "--xenlab-xen", "--xenlab-dom0-kernel",
                   "--xenlab-dom0-modules", "--xenlab-guest-kernel", "--xenlab-guest-modules", "--xenlab-load"):
        assert option in out
    result = pytester.runpytest_subprocess("--markers")
    assert "@pytest.mark.xenlab:" in result.stdout.str()


def test_inert_without_fixtures_or_marker(pytester):
    """A session that uses neither boots nothing, creates no lab state and saves no artifacts."""
    pytester.makepyfile(test_plain="""
        import sys

        def test_ok():
            assert True

        def test_fails():
            assert 1 == 2

        def test_nothing_from_the_lab_imported():
            assert "xenlab.lab.core" not in sys.modules and "libvirt" not in sys.modules
    """)
    result = pytester.runpytest_subprocess("--xenlab-name", "never-up-plugin", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    assert "xenlab artifacts" not in result.stdout.str()
    assert not (pytester.path / "xenlab-artifacts").exists()
    assert not lab_dir("never-up-plugin").exists()


def test_guest_names_are_valid_and_distinct():
    names = {guest_name("tests/test_x.py::test_" + "very_long_name" * 5 + "[param-1]", n) for n in range(1, 4)}
    assert len(names) == 3
    for name in names:
        assert re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}", name), name
    assert re.fullmatch(r"pt-ring-[0-9a-f]{4}-2", guest_name("t.py::test_ring", 2))
    assert re.fullmatch(r"pt-t-[0-9a-f]{4}-1", guest_name("t.py::Test::test", 1))
    long = "t.py::test_destructive_gets_its_own_domu[{}]"
    assert guest_name(long.format(1), 1) != guest_name(long.format(2), 1)  # ids that differ only past the cut


def test_artifacts_dir_is_per_test(pytester):
    config = pytester.parseconfig()
    a = artifacts_dir(config, "tests/test_drv.py::test_ring[4K]")
    b = artifacts_dir(config, "tests/test_drv.py::test_ring[8K]")
    assert a != b and a.parent == config.rootpath / "xenlab-artifacts"
    assert "/" not in a.name and "[" not in a.name


def test_your_own_xen_and_dom0_kernel_reach_the_lab_config(pytester, tmp_path):
    from xenlab.pytest_plugin import _lab_from_options

    config = pytester.parseconfig("--xenlab-name", "own", "--xenlab-xen", "xen.gz", "--xenlab-dom0-kernel", "/k/bzImage",
                                  "--xenlab-dom0-modules", "/k/mods")
    lab = _lab_from_options(config)
    assert lab.name == "own" and lab.cfg.xen.endswith("/xen.gz") and lab.cfg.xen.startswith("/")
    assert (lab.cfg.dom0.kernel, lab.cfg.dom0.modules) == ("/k/bzImage", "/k/mods")


def test_shards_cover_the_suite_once(pytester):
    """--xenlab-shard K/N on N runners: every test runs on exactly one of them."""
    pytester.makepyfile(test_many="import pytest\n\n@pytest.mark.parametrize('n', range(12))\ndef test_n(n):\n    print(f'RAN {n}')\n")
    ran = []
    for k in (1, 2, 3):
        result = pytester.runpytest_subprocess("--xenlab-shard", f"{k}/3", "-s", "-p", "no:cacheprovider")
        assert result.ret == 0
        ran.append({int(n) for n in re.findall(r"RAN (\d+)", result.stdout.str())})
    assert set().union(*ran) == set(range(12)) and sum(map(len, ran)) == 12
    assert all(ran), ran  # 12 tests over 3 shards: none empty (by these ids' hashes)


def test_bad_shard_refused(pytester):
    pytester.makepyfile(test_one="def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("--xenlab-shard", "4/3", "-p", "no:cacheprovider")
    assert result.ret != 0 and "--xenlab-shard '4/3': write K/N" in result.stderr.str()


GROUPED = """
import os
import pytest


@pytest.mark.xdist_group("one-lab")
@pytest.mark.parametrize("n", range(4))
def test_grouped(n):
    assert os.environ["PYTEST_XDIST_WORKER"]


@pytest.mark.parametrize("n", range(4))
def test_free(n):
    pass
"""


def test_loadgroup_keeps_a_group_on_one_worker(pytester):
    """`--dist loadgroup` with the xdist_group marker sends a group to one
    worker (pytest 9.2 dropped what pytest-xdist 3.8 groups by; the plugin puts it back)."""
    pytester.makepyfile(test_grouped=GROUPED)
    result = pytester.runpytest_subprocess("-n", "2", "--dist", "loadgroup", "-p", "no:randomly", "-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=8)
    ran = re.findall(r"\[(gw\d)\][^\n]*PASSED test_grouped.py::test_grouped", result.stdout.str())
    assert len(ran) == 4 and len(set(ran)) == 1, result.stdout.str()
