"""pytest plugin: xenlab lab fixtures for driver tests (expanded in later work)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("xenlab")
    group.addoption("--xenlab-name", default="pytest", help="name of the lab the tests use")
    group.addoption("--xenlab-keep", action="store_true", help="leave the lab running after the session")
    group.addoption("--xenlab-connect", default="", help="libvirt URI (default: embedded driver)")


def pytest_configure(config):
    config.addinivalue_line("markers", "xenlab: the test needs the real lab")
