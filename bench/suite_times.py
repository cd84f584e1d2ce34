"""Where the suite's time goes, from the JUnit XML that `ci/test.sh` keeps
(artifacts/pytest.xml): seconds per test file (set-up, call and tear-down
together, as pytest records them), largest first, and the slowest tests.
Prints one JSON document. Usage:
  python3 bench/suite_times.py [artifacts/pytest.xml] [--top N]"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from collections import defaultdict


def times(path: str, top: int) -> dict:
    cases = ET.parse(path).getroot().iter("testcase")
    per_file: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    tests = []
    for case in cases:
        # classname is the module's dotted path (tests.e2e.test_lab), plus the class if any.
        module = ".".join(part for part in case.get("classname", "").split(".") if not part[:1].isupper())
        seconds = float(case.get("time", 0))
        per_file[module] += seconds
        counts[module] += 1
        tests.append((seconds, f"{module}::{case.get('name')}"))
    total = sum(per_file.values())
    return {
        "source": path,
        "tests": len(tests),
        "seconds": round(total, 1),
        "files": [{"file": f, "tests": counts[f], "seconds": round(s, 1), "share": round(s / total, 3) if total else 0}
                  for f, s in sorted(per_file.items(), key=lambda item: -item[1])],
        "slowest": [{"test": name, "seconds": round(s, 1)} for s, name in sorted(tests, reverse=True)[:top]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("xml", nargs="?", default="artifacts/pytest.xml")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    print(json.dumps(times(args.xml, args.top), indent=2))


if __name__ == "__main__":
    main()
