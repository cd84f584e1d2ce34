"""The mirror of the fault plans: a hostile frontend (Python, in a domU whose
own blkfront is kept off its disks) against dom0's kernel blkback. What
blkback must do is written per attack in agent/hostile.py ATTACKS; on top,
dom0 and another guest must be unaffected and nothing may be left after the
attacker is destroyed."""

from __future__ import annotations

import pytest

from xenlab.agent.hostile import ATTACKS
from xenlab.guest.hardening import NO_BLKFRONT, attack_blkback
from xenlab.guest.manager import Guests
from xenlab.guest.spec import DiskSpec, GuestSpec

from .conftest import fresh_guest

pytestmark = pytest.mark.gate


def test_blkback_refuses_a_hostile_frontend(lab):
    bystander_spec = GuestSpec(name="hf-bystander", disks=(DiskSpec(16),))
    attacker_spec = GuestSpec(name="hf-attacker", root="python", memory=128, no_stock=NO_BLKFRONT)
    with fresh_guest(lab, bystander_spec), Guests(lab) as guests:
        if any(g["name"] == "hf-attacker" for g in guests.list()):
            guests.destroy("hf-attacker")
        try:
            attacker = guests.start(attacker_spec)
            _attack(lab, guests, attacker, guests.get("hf-bystander"))
        finally:
            if any(g["name"] == "hf-attacker" for g in guests.list()):
                guests.destroy("hf-attacker")


def _attack(lab, guests, attacker, bystander):
    assert "xvd" not in attacker.exec("cat /proc/partitions").stdout  # its blkfront is off
    rw = attacker.attach_disk("8M", backend="kernel", own_frontend=True)
    ro = attacker.attach_disk("8M", backend="kernel", readonly=True, own_frontend=True)

    readonly = attack_blkback(attacker, ro, "write-readonly")
    assert [r["attack"] for r in readonly["results"]] == ["valid-read", "write-readonly", "valid-read"]
    assert all(r["ok"] for r in readonly["results"]), readonly["results"]
    assert readonly["backend_final_state"] == "Closed"

    everything = attack_blkback(attacker, rw)
    by_attack = {}
    for r in everything["results"]:
        by_attack.setdefault(r["attack"], []).append(r)
    assert set(by_attack) == set(ATTACKS) - {"write-readonly"}
    bad = [r for r in everything["results"] if not r["ok"]]
    assert not bad, bad
    assert everything["results"][-1]["attack"] == "lying-req-prod"
    assert any("bogus ring requests" in line for line in everything["dom0_log"]), everything["dom0_log"]
    assert everything["backend_final_state"] == "Closed"  # blkback still closes down in order afterwards

    # dom0 and the other guest are unaffected
    with lab.ssh() as ssh:
        assert ssh.run("xl list").ok
    io = bystander.exec("dd if=/dev/urandom of=/tmp/a bs=4096 count=64 2>/dev/null && dd if=/tmp/a of=/dev/xvda bs=4096 oflag=direct 2>/dev/null "
                        "&& dd if=/dev/xvda of=/tmp/b bs=4096 count=64 iflag=direct 2>/dev/null && cmp /tmp/a /tmp/b && echo same")
    assert io.stdout.strip() == "same", io.stderr
    domid = attacker.domid
    destroyed = guests.destroy("hf-attacker")
    assert not any(destroyed["leftovers"].values()), destroyed["leftovers"]
    with lab.ssh() as ssh:
        threads = ssh.check("ps -eo comm").split()
        assert not [t for t in threads if t.startswith(f"blkback.{domid}.")], threads  # blkback's per-disk threads ended
