"""The latency placement's pure parts: reading `xl vcpu-list` and the pin
plan (the pinning itself is exercised on the real lab in tests/e2e)."""

import pytest

from xenlab.agent import placement
from xenlab.agent.placement import parse_vcpu_list, plan

# `xl vcpu-list` as the lab's Xen 4.17 prints it, with a vCPU pinned by hand
# and an offline one added.
VCPU_LIST = """\
Name                                ID  VCPU   CPU State   Time(s) Affinity (Hard / Soft)
Domain-0                             0     0    0   -b-     139.1  all / all
Domain-0                             0     1    1   r--     126.5  0-1 / all
pyg                                  1     0    1   -b-      65.6  1 / 0
pyg                                  1     1    -   --p       0.0  all / all
"""


def test_parse_vcpu_list_reads_hard_affinity_per_vcpu():
    assert parse_vcpu_list(VCPU_LIST) == {0: "1", 1: "all"}  # later lines of the same vCPU number win: one domain per call
    dom0_only = "\n".join(VCPU_LIST.splitlines()[:3])
    assert parse_vcpu_list(dom0_only) == {0: "all", 1: "0-1"}


def test_parse_vcpu_list_ignores_noise():
    assert parse_vcpu_list("") == {}
    assert parse_vcpu_list("Name ID VCPU\nlibxl: error: no such domain\n") == {}


def test_plan_gives_the_measuring_vcpu_a_physical_cpu_of_its_own():
    assert plan([0, 1], [0], measuring_vcpu=0, pcpus=2) == {(0, 0): "0", (0, 1): "1", (-1, 0): "1"}
    assert plan([0, 1], [0, 1], measuring_vcpu=1, pcpus=4) == {
        (0, 0): "1-3", (0, 1): "0", (-1, 0): "1-3", (-1, 1): "1-3"}


def test_plan_refuses_a_vcpu_dom0_does_not_have():
    with pytest.raises(placement.PlacementError, match="dom0 has no vCPU 3"):
        plan([0, 1], [0], measuring_vcpu=3, pcpus=2)
