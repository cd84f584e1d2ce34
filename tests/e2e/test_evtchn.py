"""Event channels on the real lab: the seed-002 catalogue read back through
EVTCHNOP_status, `xenlab evtchn ls/ping/catalogue`, and refusals that leave
nothing bound. The domU parts use a python guest of their own."""

from __future__ import annotations

import json

import pytest

from xenlab.errors import ChannelError
from xenlab.evtchn.catalogue import catalogue, evtchn_ls
from xenlab.evtchn.ping import ping
from xenlab.guest.manager import Guests
from xenlab.guest.spec import GuestSpec

from .conftest import LAB, fresh_guest, vcpu_affinities, xenlab

GUEST = "evt-peer"


@pytest.fixture(scope="module")
def peer(lab):
    with fresh_guest(lab, GuestSpec(name=GUEST, root="python")) as info:
        yield info


def _by_op(checks):
    ops = {}
    for c in checks:
        ops.setdefault(c["seed_op"].split(" ")[0], []).append(c)
    return ops


@pytest.mark.gate
def test_catalogue_in_dom0_covers_every_seed_operation(lab):
    result = catalogue(lab)
    failed = [c for c in result["checks"] if not c["ok"]]
    assert not failed, json.dumps(failed, indent=1)
    ops = _by_op(result["checks"])
    for op in ("EVTCHNOP_alloc_unbound", "EVTCHNOP_bind_interdomain", "EVTCHNOP_bind_virq", "EVTCHNOP_bind_ipi",
               "EVTCHNOP_send", "EVTCHNOP_close", "EVTCHNOP_bind_vcpu", "EVTCHNOP_unmask", "EVTCHNOP_reset",
               "EVTCHNOP_status", "IOCTL_EVTCHN_RESTRICT_DOMID"):
        assert op in ops, f"no check covers {op}"
    refusals = [c for c in result["checks"] if "refusal" in c["seed_op"]]
    got = {c["got"] for c in refusals}
    assert {"EINVAL", "EEXIST", "ENOTCONN", "ESRCH"} <= got  # invalid port, not offered, bound virq, no domain


@pytest.mark.full
def test_catalogue_against_a_domu(lab, peer):
    result = catalogue(lab, GUEST)
    failed = [c for c in result["checks"] if not c["ok"]]
    assert not failed, json.dumps(failed, indent=1)
    inter = [c for c in result["checks"] if c["seed_op"] == "EVTCHNOP_bind_interdomain" and "domU" in c["check"]]
    assert inter and inter[0]["status"]["remote_domid"] == peer["domid"]
    assert inter[0]["peer_status"]["remote_domid"] == 0


@pytest.mark.gate
def test_evtchn_ls_cli_decodes_dom0_and_the_domu(lab, peer):
    data = json.loads(xenlab("evtchn", "ls", "--name", LAB, "0", "--json").stdout)
    states = {p["state"] for p in data["ports"]}
    assert {"virq", "ipi", "interdomain"} <= states
    domu = json.loads(xenlab("evtchn", "ls", "--name", LAB, str(peer["domid"]), "--json").stdout)
    # the domU's xenstore and console channels go to dom0
    assert any(p["state"] == "interdomain" and p["remote_domid"] == 0 for p in domu["ports"])
    text = xenlab("evtchn", "ls", "--name", LAB, "0").stdout
    assert "VIRQ 0 (timer)" in text


@pytest.mark.gate
def test_evtchn_ls_nonexistent_domain_is_a_clear_error(lab_info):
    proc = xenlab("evtchn", "ls", "--name", LAB, "31000", check=False)
    assert proc.returncode != 0
    assert "domain 31000 does not exist" in proc.stdout + proc.stderr and "hint" in proc.stdout + proc.stderr


@pytest.mark.gate
def test_ping_round_trips_between_dom0_and_domu(lab, peer):
    before = evtchn_ls_ports(lab)
    result = ping(lab, GUEST, count=300)
    assert result["count"] == 300 and result["guest_answered"] == 320
    assert result["mean_us"] > 0 and result["overall_mean_us"] > 0  # (min may read 0: the PV clock clamps under TCG)
    assert evtchn_ls_ports(lab) == before  # nothing left bound in dom0
    proc = xenlab("evtchn", "ping", "--name", LAB, GUEST, "--count", "50")
    assert "50 round trips" in proc.stdout


@pytest.mark.full
def test_ping_placement_pins_for_the_run_and_puts_everything_back(lab, peer):
    before = vcpu_affinities(lab)
    result = ping(lab, GUEST, count=200, dom0_vcpu=1)
    placed = result["placement"]
    assert result["vcpu"] == 1 and result["count"] == 200
    # read back from Xen during the run: vCPU 1 alone on pCPU 0, the rest on pCPU 1
    assert placed["pinned"] == {"0.0": "1", "0.1": "0", f"{peer['domid']}.0": "1"}
    assert placed["port_vcpu"] == 1  # EVTCHNOP_status: the port was rebound to the timing vCPU
    assert placed["not_restored"] == []  # every pin put back
    assert vcpu_affinities(lab) == before
    as_is = ping(lab, GUEST, count=100, place=False)
    assert as_is["placement"] is None and vcpu_affinities(lab) == before
    proc = xenlab("evtchn", "ping", "--name", LAB, GUEST, "--count", "20", "--dom0-vcpu", "7", check=False)
    assert proc.returncode != 0 and "dom0 has no online vCPU 7" in proc.stdout + proc.stderr
    assert vcpu_affinities(lab) == before



@pytest.mark.full
def test_ping_placement_is_put_back_when_the_dom0_side_is_terminated(lab, peer):
    from xenlab.guest.agentrun import Dom0Process

    before = vcpu_affinities(lab)
    with lab.ssh() as ssh:
        # No pong side: the dom0 process sits placed, waiting for the peer's hello.
        proc = Dom0Process(ssh, "evtchn", "ping", "--remote", str(peer["domid"]), "--place", "--timeout", "120")
        pid = proc.readline(60)["pid"]
        during = vcpu_affinities(lab)
        assert during[("0", "0")].startswith("0 /") and during[(str(peer["domid"]), "0")].startswith("1 /")
        ssh.check(f"kill -TERM {pid}")
        with pytest.raises(ChannelError, match="stopped by signal SIGTERM"):
            proc.wait(60)
    assert vcpu_affinities(lab) == before


@pytest.mark.gate
def test_ping_unknown_guest_refused(lab_info):
    proc = xenlab("evtchn", "ping", "--name", LAB, "no-such-guest", check=False)
    assert proc.returncode != 0 and "no domain named 'no-such-guest'" in proc.stdout + proc.stderr


@pytest.mark.full
def test_bad_grant_refs_refused_cleanly(lab, dom0):
    from xenlab.guest.agentrun import agent

    with lab.ssh() as ssh:
        with pytest.raises(ChannelError, match="cannot map grant ref"):
            agent(ssh, "grant", "map", "--domid", "0", "--ref", "999999")
        with pytest.raises(ChannelError, match="cannot map grant ref"):
            agent(ssh, "grant", "map", "--domid", "31000", "--ref", "8")
        loop = agent(ssh, "grant", "loopback", "--pages", "3")
    assert loop["mapped_sees"] == "hello" and loop["sharer_sees"] == "world"


def evtchn_ls_ports(lab):
    with lab.ssh() as ssh:
        return [(p["port"], p["state"]) for p in evtchn_ls(ssh, 0)["ports"]]


@pytest.mark.full
def test_catalogue_cli_names_the_seed_operation_of_each_check(lab_info):
    proc = xenlab("evtchn", "catalogue", "--name", LAB)
    lines = [l for l in proc.stdout.splitlines() if l.strip()]
    assert lines and all(l.startswith("ok") for l in lines), proc.stdout
    assert any("EVTCHNOP_bind_vcpu" in l for l in lines) and any("EVTCHNOP_reset" in l for l in lines)


@pytest.mark.full
def test_evtchn_reset_of_a_victim_domu_closes_all_its_ports(lab):
    from xenlab.evtchn.catalogue import reset_domain

    victim = "evt-victim"
    with Guests(lab) as guests:
        guests.create(GuestSpec(name=victim))
    try:
        result = reset_domain(lab, victim)
        assert result["ok"] and result["ports_before"] > 0 and result["ports_after"] == 0 and result["ports_listed_after"] == []
        # dom0's ends (xenstored, xenconsoled) are now unbound, waiting for the guest again
        assert result["dom0_ends_after"] and all(p["state"] == "unbound" and p["remote_domid"] == result["domid"] for p in result["dom0_ends_after"])
    finally:
        with Guests(lab) as guests:
            guests.destroy(victim)
    with lab.ssh() as ssh:
        assert not ssh.run(["xl", "domid", victim]).ok
