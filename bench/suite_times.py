"""Where the suite's time goes, from the JUnit XML that `ci/test.sh` keeps
(artifacts/pytest.xml): seconds per test file (set-up, call and tear-down
together, as pytest records them), largest first, the same per tier (`gate`,
`full`, `unit`: tests/conftest.py records each test's tier in the XML) with
the full tier per slice of the rotation (tests/tiers.py), and the slowest
tests. Prints one JSON document. Usage:
  python3 bench/suite_times.py [artifacts/pytest.xml] [--top N]"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path


def times(path: str, top: int) -> dict:
    cases = ET.parse(path).getroot().iter("testcase")
    per_file: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    per_tier: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    full_tests: list[tuple[str, str, float]] = []  # (module, test function, seconds)
    tests = []
    for case in cases:
        # classname is the module's dotted path (tests.e2e.test_lab), plus the class if any.
        module = ".".join(part for part in case.get("classname", "").split(".") if not part[:1].isupper())
        seconds = float(case.get("time", 0))
        per_file[module] += seconds
        counts[module] += 1
        tier = next((p.get("value") for p in case.iter("property") if p.get("name") == "tier"), "unknown")
        per_tier[tier][module] += seconds
        if tier == "full":
            full_tests.append((module, case.get("name", "").split("[")[0], seconds))
        tests.append((seconds, f"{module}::{case.get('name')}"))
    total = sum(per_file.values())
    return {
        "source": path,
        "tests": len(tests),
        "seconds": round(total, 1),
        "files": [{"file": f, "tests": counts[f], "seconds": round(s, 1), "share": round(s / total, 3) if total else 0}
                  for f, s in sorted(per_file.items(), key=lambda item: -item[1])],
        "tiers": {tier: {"seconds": round(sum(files.values()), 1),
                         "files": {f: round(s, 1) for f, s in sorted(files.items(), key=lambda item: -item[1])}}
                  for tier, files in sorted(per_tier.items())},
        "full_slices": _slices(full_tests),
        "slowest": [{"test": name, "seconds": round(s, 1)} for s, name in sorted(tests, reverse=True)[:top]],
    }


def _slices(full_tests: list[tuple[str, str, float]]) -> dict[str, float]:
    """The full tier's seconds per slice of the rotation (tests/tiers.py), when run from the checkout."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    try:
        from tests import tiers
    except ImportError:
        return {}
    slices: dict[str, float] = defaultdict(float)
    for module, function, seconds in full_tests:
        slices[str(tiers.slice_of(module.rsplit(".", 1)[-1] + ".py", function))] += seconds
    return {k: round(v, 1) for k, v in sorted(slices.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("xml", nargs="?", default="artifacts/pytest.xml")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    print(json.dumps(times(args.xml, args.top), indent=2))


if __name__ == "__main__":
    main()
