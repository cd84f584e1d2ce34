"""Event channel round trips between a dom0 process (timing) and a domU
process (echoing), userspace to userspace."""

from __future__ import annotations

from xenlab.guest.agentrun import Dom0Process, domid_of, guest_run, guests_of


def ping(lab, guest: str, count: int = 1000, spin: bool = False, place: bool = True, dom0_vcpu: int = 0) -> dict:
    """Event channel round trips between dom0 (timing) and the domU (echoing).
    spin: both sides poll without blocking (no scheduler wake-ups on either side).
    place: the timing process, its vCPU and its port's interrupt together on a
    physical CPU the domU does not use, for the run only (agent placement.py)."""
    with lab.ssh() as ssh, guests_of(lab) as guests:
        domid = domid_of(ssh, guest)
        flag = ["--spin"] if spin else []
        proc = Dom0Process(ssh, "evtchn", "ping", "--remote", str(domid), "--count", str(count), *flag,
                           *(["--place", "--vcpu", str(dom0_vcpu)] if place else []))
        port = proc.readline(60)["port"]
        pong = guest_run(guests, guest, f"evtchn pong --remote 0 --port {port} --count {count + 20} {' '.join(flag)}", timeout=120 + count * 0.05)
        result = proc.wait(60)
        result.update(guest=guest, domid=domid, guest_answered=pong["answered"])
        return result


def placement_text(placed: dict | None) -> str:
    if not placed:
        return "as placed by Xen"
    if "skipped" in placed:
        return f"placement skipped: {placed['skipped']}"
    text = f"dom0 vCPU {placed['dom0_vcpu']} alone on pCPU {placed['dom0_vcpu_pcpus']}, domU on pCPU {placed['guest_pcpus']}"
    return text + (f"; NOT restored: {', '.join(placed['not_restored'])}" if placed.get("not_restored") else "")
