"""bench/suite_times.py: seconds per test file from pytest's JUnit XML."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import suite_times  # noqa: E402

XML = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.e2e.test_lab" name="test_up" time="30.5"/>
<testcase classname="tests.e2e.test_lab" name="test_down[SIGINT]" time="9.5"/>
<testcase classname="tests.e2e.test_guest.TestRing" name="test_block" time="60.0"/>
<testcase classname="tests.unit.test_cli" name="test_help" time="0.2"/>
</testsuite></testsuites>
"""


def test_seconds_per_file_largest_first_and_classes_folded_into_their_file(tmp_path):
    path = tmp_path / "pytest.xml"
    path.write_text(XML)
    result = suite_times.times(str(path), top=2)
    assert result["tests"] == 4 and result["seconds"] == 100.2
    assert [(f["file"], f["tests"], f["seconds"]) for f in result["files"]] == [
        ("tests.e2e.test_guest", 1, 60.0), ("tests.e2e.test_lab", 2, 40.0), ("tests.unit.test_cli", 1, 0.2)]
    assert [t["test"] for t in result["slowest"]] == ["tests.e2e.test_guest::test_block", "tests.e2e.test_lab::test_up"]
