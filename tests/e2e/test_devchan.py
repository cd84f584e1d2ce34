"""The Python device channel on the real lab: frontend in a domU, backend in
dom0 (seed 004) -- XenBus handshake, thousands of checksummed requests both
ways, ring full and wrap, peer death, and a peer writing garbage indices."""

from __future__ import annotations

import json

import pytest

from xenlab.evtchn.catalogue import grants_mapped
from xenlab.evtchn.devchan import devchan, devchan_peer_death
from xenlab.guest.agentrun import DOMU_AGENT
from xenlab.guest.manager import Guests
from xenlab.guest.spec import GuestSpec

from .conftest import LAB, fresh_guest, vcpu_affinities, xenlab

GUEST = "devchan-fe"


@pytest.fixture(scope="module")
def front(lab):
    with fresh_guest(lab, GuestSpec(name=GUEST, root="python")) as info:
        yield info


def assert_clean(lab, domid, result):
    back = result["backend"]
    assert back["mapped_after"] is False and back["bound_after"] is False
    with lab.ssh() as ssh:
        assert sorted(grants_mapped(ssh, domid)) == [0, 1]  # only the console and xenstore pages
        assert not ssh.run(f"xenstore-exists /local/domain/0/backend/xlchan/{domid}").ok


@pytest.mark.gate
def test_thousands_of_echo_requests_with_ring_full_and_u32_wrap(lab, front):
    # start near 2**32 so the free-running indices wrap during the run
    result = devchan(lab, GUEST, "--count 5000 --size 1024 --op echo --start-index 0xfffff000", devid=1)
    f, b = result["frontend"], result["backend"]
    assert f["requests"] == 5000 and b["requests"] == 5000 and b["bad_requests"] == 0
    assert f["bytes_out"] == f["bytes_in"] == 5000 * 1024 == b["bytes_in"] == b["bytes_out"]
    assert f["ring_full_seen"] > 0 and b["max_unconsumed"] == b["ring_size"] == 128
    assert f["indices"]["req_prod"] == (0xFFFFF000 + 5000) & 0xFFFFFFFF  # wrapped past 2**32
    assert b["states"] == ["InitWait", "Connected", "Closing", "Closed"] and b["ended"] == "frontend-closed"
    assert f["backend_final_state"] == "Closed"
    # notifications only when asked: far fewer than one per request
    assert f["notifies_sent"] < 5000 / 4 and b["notifies_sent"] < 5000 / 4
    assert_clean(lab, front["domid"], result)


@pytest.mark.full
@pytest.mark.parametrize("op", ["write", "read", "nop"])
def test_each_direction_and_burst_fill(lab, front, op):
    result = devchan(lab, GUEST, f"--count 2000 --size 3000 --op {op} --burst", devid=2)
    f, b = result["frontend"], result["backend"]
    assert f["requests"] == 2000 and b["ended"] == "frontend-closed"
    if op == "write":
        assert b["bytes_in"] == 2000 * 3000 and f["bytes_in"] == 0
    if op == "read":
        assert f["bytes_in"] == 2000 * 3000 and b["bytes_out"] == 2000 * 3000
    assert b["max_unconsumed"] == 128
    assert_clean(lab, front["domid"], result)


@pytest.mark.full
def test_backend_notices_frontend_death_and_unmaps(lab, front):
    result = devchan_peer_death(lab, GUEST, devid=3, run_seconds=3)
    b = result["backend"]
    assert b["ended"] == "peer-died" and b["requests"] > 0
    assert b["states"] == ["InitWait", "Connected", "Closed"]
    assert b["noticed_after_s"] < 10
    assert len(result["guest_grants_mapped_during"]) >= 129  # ring + 128 data pages were mapped
    assert sorted(result["guest_grants_mapped_after"]) == sorted(result["guest_grants_mapped_before"])
    assert result["dom0_ports_to_guest_after"] == result["dom0_ports_to_guest_before"]
    assert result["xenstore_left"] == []


@pytest.mark.gate
def test_garbage_producer_index_rejected_not_crashed(lab, front):
    result = devchan(lab, GUEST, "--evil garbage-prod", devid=4)
    b = result["backend"]
    assert b["ended"] == "rejected-garbage" and "garbage index" in b["error"]
    # The backend began the closedown (Closing), and closed after the frontend.
    assert b["requests"] == 0 and result["frontend"]["backend_state"] == "Closing"
    assert b["states"] == ["InitWait", "Connected", "Closing", "Closed"] and result["frontend"]["backend_final_state"] == "Closed"
    assert_clean(lab, front["domid"], result)


@pytest.mark.full
def test_request_for_a_page_out_of_range_gets_einval(lab, front):
    result = devchan(lab, GUEST, "--evil bad-page --count 300", devid=5)
    assert result["backend"]["bad_requests"] == 1 and result["frontend"]["requests"] == 300
    assert_clean(lab, front["domid"], result)


@pytest.mark.full
def test_ring_bench_cli(lab, front):
    before = vcpu_affinities(lab)
    proc = xenlab("ring", "bench", "--name", LAB, GUEST, "--count", "1000", "--size", "2048", "--json")
    data = json.loads(proc.stdout)
    assert data["frontend"]["requests"] == 1000 and data["frontend"]["mb_per_s"] > 0
    placed = data["backend"]["placement"]  # placed by default: read back from Xen during the run
    assert placed["pinned"] == {"0.0": "0", "0.1": "1", f"{front['domid']}.0": "1"} and placed["not_restored"] == []
    assert vcpu_affinities(lab) == before
    proc = xenlab("ring", "bench", "--name", LAB, GUEST, "--count", "300", "--op", "nop", "--no-placement", "--json")
    data = json.loads(proc.stdout)
    assert data["frontend"]["requests"] == 300 and "placement" not in data["backend"]


@pytest.mark.gate
def test_ring_bench_refusals(lab_info):
    proc = xenlab("ring", "bench", "--name", LAB, "no-such-guest", check=False)
    assert proc.returncode != 0 and "no domain named" in proc.stdout + proc.stderr
    proc = xenlab("ring", "bench", "--name", LAB, "x", "--size", "5000", check=False)
    assert proc.returncode != 0 and "out of range" in proc.stdout + proc.stderr


@pytest.mark.full
def test_frontend_without_backend_is_a_clear_error(lab, front):
    with Guests(lab) as guests:
        result = guests.exec(GUEST, DOMU_AGENT + "devchan frontend --devid 9")
    assert result.exit_status == 3 and "no device xlchan/9" in result.stderr


@pytest.mark.full
def test_dom0_only_device_channel(lab):
    # frontend and backend both in dom0 (domid 0): the same code path without a guest
    result = devchan(lab, None, "--count 2000 --size 512", devid=6)
    assert result["frontend"]["requests"] == 2000 and result["backend"]["ended"] == "frontend-closed"
