"""Event channels on the real lab: every operation of the catalogue in dom0
and against a domU, decoded EVTCHNOP_status listings, EVTCHNOP_reset of a
domU, and which grants of a domain are mapped (Xen's 'g' debug key)."""

from __future__ import annotations

import re

from xenlab.errors import ChannelError
from xenlab.guest.agentrun import Dom0Process, agent, domid_of, guest_run, guests_of
from xenlab.lab.ssh import SSHSession


# -- operations ------------------------------------------------------------------
def evtchn_ls(ssh: SSHSession, domid: int) -> dict:
    return agent(ssh, "evstatus", "ls", "--domid", str(domid))


def _interdomain_ports(ssh: SSHSession, domid: int) -> list[int]:
    return sorted(p["port"] for p in evtchn_ls(ssh, 0)["ports"] if p["state"] == "interdomain" and p.get("remote_domid") == domid)


def grants_mapped(ssh: SSHSession, domid: int) -> list[int]:
    """Grant refs of `domid` that someone has mapped (active, pinned), from Xen's 'g' debug-key dump.

    The dump lists, per domain, each active entry as `[0xREF] localdom mfn pin ...`;
    a domain's refs 0 and 1 (console, xenstore) are always mapped by dom0."""
    ssh.check("xl debug-keys g")
    text = ssh.check("xl dmesg | tail -n 2000")
    dump = text.rsplit("gnttab_usage_print_all [", 1)[-1]
    refs: list[int] = []
    inside = False
    for line in dump.splitlines():
        if "grant-table for remote d" in line:
            inside = line.split("grant-table for remote d", 1)[1].split()[0] == str(domid)
            continue
        m = re.search(r"\] \[0x([0-9a-f]+)\]", line)
        if inside and m:
            refs.append(int(m.group(1), 16))
    return refs


def catalogue(lab, guest: str | None = None) -> dict:
    """Every catalogue check in dom0; with a guest, the interdomain ones against it too."""
    with lab.ssh() as ssh:
        result = agent(ssh, "catalogue", "run", timeout=300)
        checks = result["checks"]
        if guest:
            with guests_of(lab) as guests:
                domid = domid_of(ssh, guest)
                proc = Dom0Process(ssh, "catalogue", "offer", "--peer", str(domid))
                port = proc.readline(60)["port"]
                guest_run(guests, guest, f"evtchn pong --remote 0 --port {port} --count 1 --linger 3", timeout=120)
                checks += proc.wait(60)["checks"]
                # The domU may not bind a dom0 port that was not offered to it (port 1: dom0's timer VIRQ).
                try:
                    guest_run(guests, guest, "evtchn pong --remote 0 --port 1 --count 0", timeout=120)
                    checks.append({"check": "domU bind to a dom0 port not offered to it", "seed_op": "EVTCHNOP_bind_interdomain (refusal)", "ok": False, "got": "succeeded"})
                except ChannelError as e:
                    checks.append({"check": "domU bind to a dom0 port not offered to it", "seed_op": "EVTCHNOP_bind_interdomain (refusal)",
                                   "ok": "EINVAL" in e.message, "got": e.message})
        return {"checks": checks, "ok": all(c["ok"] for c in checks)}


def reset_domain(lab, guest: str) -> dict:
    """EVTCHNOP_reset of a domU (destructive: the guest loses its console and
    XenStore channels; use one you destroy afterwards)."""
    with lab.ssh() as ssh:
        domid = domid_of(ssh, guest)
        before_dom0 = _interdomain_ports(ssh, domid)
        result = agent(ssh, "catalogue", "reset", "--domid", str(domid))
        after = evtchn_ls(ssh, domid)["ports"]
        # dom0's ends of the guest's channels fall back to unbound, offered to the guest again
        dom0_ends = [p for p in evtchn_ls(ssh, 0)["ports"] if p["port"] in before_dom0]
        result.update(guest=guest, domid=domid, ports_listed_after=after, dom0_ends_after=dom0_ends)
        return result
