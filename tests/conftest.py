import os

import pytest

from tests import tiers

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_addoption(parser):
    parser.addoption("--slice", type=int, default=None, metavar="K",
                     help=f"run the gate tier, the unit tests and only slice K (0-{tiers.SLICES - 1}) of the full tier "
                          "(tests/tiers.py; without it both tiers run whole)")


def pytest_configure(config):
    k = config.getoption("--slice")
    if k is not None and not 0 <= k < tiers.SLICES:
        raise pytest.UsageError(f"--slice {k}: the full tier has slices 0 to {tiers.SLICES - 1} (tests/tiers.py)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)
        # Kept in the JUnit XML, so bench/suite_times.py can sum each tier per file.
        tier = [name for name in ("gate", "full") if item.get_closest_marker(name)]
        item.user_properties.append(("tier", tier[0] if len(tier) == 1 else "unit" if "/unit/" in str(item.fspath) else "none"))
    k = config.getoption("--slice")
    if k is None:
        return
    kept, dropped = [], []
    for item in items:
        in_full = item.get_closest_marker("full") is not None
        function = getattr(item, "originalname", item.name)
        (dropped if in_full and tiers.slice_of(str(item.fspath), function) != k else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
