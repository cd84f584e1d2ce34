"""The e2e tiers (tests/tiers.py, docs/testing.md#tiers): every e2e test is
in exactly one of `gate` and `full`, and every full-tier test in one slice
of the rotation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import tiers

ROOT = Path(__file__).resolve().parents[2]

# Run in a process of its own: each e2e test's node id, its tier markers and module.
COLLECT = r'''
import json, sys
import pytest

class Collector:
    def __init__(self):
        self.items = []

    def pytest_collection_finish(self, session):
        for item in session.items:
            self.items.append({"id": item.nodeid, "module": item.path.name,
                               "tiers": sorted({m.name for m in item.iter_markers() if m.name in ("gate", "full")}),
                               "tier_marks": sum(1 for m in item.iter_markers() if m.name in ("gate", "full"))})

collector = Collector()
code = pytest.main(["tests/e2e", "--collect-only", "-q", "-p", "no:cacheprovider"] + sys.argv[1:], plugins=[collector])
print("@@" + json.dumps({"code": int(code), "items": collector.items}))
'''


def collected(*args: str) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", COLLECT, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    line = [l for l in proc.stdout.splitlines() if l.startswith("@@")]
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(line[-1][2:])
    assert result["code"] in (0, 5), "\n".join(l for l in proc.stdout.splitlines() if not l.startswith("@@"))[-3000:]
    return result["items"]


@pytest.fixture(scope="module")
def e2e_items() -> list[dict]:
    items = collected()
    assert len(items) > 100, len(items)  # the collection really saw the e2e suite
    return items


def test_every_e2e_test_is_in_exactly_one_tier(e2e_items):
    neither = [i["id"] for i in e2e_items if not i["tiers"]]
    both = [i["id"] for i in e2e_items if i["tiers"] == ["full", "gate"] or i["tier_marks"] > 1]
    assert neither == [], f"e2e tests with no tier: mark them @pytest.mark.gate or @pytest.mark.full: {neither}"
    assert both == [], f"e2e tests marked more than once (gate and full, or twice): keep one: {both}"


def test_every_module_with_full_tier_tests_has_a_slice(e2e_items):
    modules = {i["module"] for i in e2e_items if i["tiers"] == ["full"]}
    functions = {i["module"] + "::" + i["id"].split("::")[-1].split("[")[0] for i in e2e_items if i["tiers"] == ["full"]}
    named_modules = {key for key in tiers.FULL_SLICES if "::" not in key}
    assert sorted(modules - named_modules) == [], "add these modules to tests/tiers.py FULL_SLICES"
    assert sorted(named_modules - modules) == [], "FULL_SLICES names modules with no full-tier test"
    assert sorted({key for key in tiers.FULL_SLICES if "::" in key} - functions) == [], "FULL_SLICES names full-tier tests that do not exist"
    assert all(0 <= s < tiers.SLICES for s in tiers.FULL_SLICES.values())
    assert all(0 <= s < tiers.SLICES for s in tiers.POST_STEPS.values())


def test_the_slices_together_are_the_full_tier(e2e_items):
    full = {i["id"] for i in e2e_items if i["tiers"] == ["full"]}
    gate = {i["id"] for i in e2e_items if i["tiers"] == ["gate"]}
    union: set[str] = set()
    for k in range(tiers.SLICES):
        ran = {i["id"] for i in collected("--slice", str(k))}
        assert gate <= ran, f"slice {k} dropped gate tests: {sorted(gate - ran)[:5]}"
        union |= ran - gate
    assert union == full


def test_a_slice_that_does_not_exist_is_refused():
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/e2e", "--collect-only", "-q", "--slice", str(tiers.SLICES)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 4 and f"the full tier has slices 0 to {tiers.SLICES - 1}" in proc.stderr, proc.stderr


def test_the_commit_picks_its_slice():
    count = int(subprocess.run(["git", "-C", str(ROOT), "rev-list", "--count", "HEAD"], capture_output=True, text=True,
                               check=True).stdout)
    assert tiers.commit_slice(ROOT) == count % tiers.SLICES
    plan = subprocess.run([sys.executable, "tests/tiers.py", "plan", "1"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert plan.startswith(f"slice 1 of {tiers.SLICES}: full-tier tests of ")
