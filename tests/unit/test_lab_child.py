"""xenlab.lab.child: a lab operation run in a child process raises the
child's error here, class, message and hint intact (its results on a real
lab: tests/e2e/test_plugin.py)."""

from __future__ import annotations

import pytest

from xenlab import config
from xenlab.errors import LabError
from xenlab.lab import child


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("XENLAB_STATE", str(tmp_path / "state"))
    return tmp_path / "state"


def test_reset_of_a_lab_that_is_down_raises_the_childs_error(state):
    cfg = config.load(overrides={"name": "child-down"})
    with pytest.raises(LabError) as caught:
        child.call(cfg, "reset")
    assert caught.value.message == "lab 'child-down' is not up"
    assert caught.value.hint == "start it with `xenlab up --lab child-down`"


def test_an_unknown_operation_is_refused_before_a_child_starts():
    with pytest.raises(ValueError, match="unknown lab operation 'boot'"):
        child.call(config.load(overrides={"name": "x"}), "boot")
