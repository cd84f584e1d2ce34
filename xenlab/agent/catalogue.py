"""The event channel catalogue: every event channel operation a guest can reach,
done from dom0 userspace (/dev/xen/evtchn) and read back through
EVTCHNOP_status (libxenctrl). Each check names the seed operation it covers.

`python3 -m xenlab_agent.catalogue run [--peer DOMID]` prints
{"checks": [...]}; with --peer, a domU has been asked (by the host) to bind
the ports this prints on its `offer` lines, see `offer`."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import time

from .errors import AgentError
from .evstatus import Xc
from .evtchn import EventChannel, EvtchnError
from .virq import VIRQS

FREE_GLOBAL_VIRQS = ("con_ring", "tbuf", "debugger", "enomem")
NO_SUCH_DOMID = 31000  # below DOMID_FIRST_RESERVED, never a real domain in a lab


class Catalogue:
    def __init__(self) -> None:
        self.xc = Xc()
        self.checks: list[dict] = []
        self.handles: list[EventChannel] = []

    def handle(self) -> EventChannel:
        h = EventChannel()
        self.handles.append(h)
        return h

    def record(self, name: str, seed_op: str, ok: bool, **detail) -> bool:
        self.checks.append({"check": name, "seed_op": seed_op, "ok": bool(ok), **detail})
        return ok

    def refused(self, name: str, seed_op: str, expect: int, func, *args) -> None:
        try:
            value = func(*args)
        except EvtchnError as e:
            self.record(name, seed_op, e.errno == expect, expected=errno.errorcode[expect], got=errno.errorcode.get(e.errno) if e.errno is not None else None, message=e.message)
            return
        self.record(name, seed_op, False, expected=errno.errorcode[expect], got=f"succeeded ({value})")

    def status(self, port: int, domid: int = 0) -> dict:
        return self.xc.status(domid, port)

    # -- the checks ------------------------------------------------------------
    def run(self) -> None:
        a, b = self.handle(), self.handle()

        pa = a.bind_unbound(0)
        st = self.status(pa)
        self.record("alloc_unbound shows the remote domain", "EVTCHNOP_alloc_unbound", st["state"] == "unbound" and st["remote_domid"] == 0, port=pa, status=st)

        pb = b.bind_interdomain(0, pa)
        sa, sb = self.status(pa), self.status(pb)
        self.record(
            "bind_interdomain connects both ends", "EVTCHNOP_bind_interdomain",
            sb["state"] == "interdomain" and sb["remote_domid"] == 0 and sb["remote_port"] == pa and sa.get("remote_port") == pb,
            port=pb, status=sb, peer_status=sa,
        )
        b.wait(pb, 0.5)  # Xen sets the new local port pending on bind; take it out of the way

        a.notify(pa)
        self.record("send is delivered to the peer port", "EVTCHNOP_send", b.wait(pb, 5.0) == pb, port=pa, delivered_on=pb)
        b.notify(pb)
        self.record("send is delivered back", "EVTCHNOP_send", a.wait(pa, 5.0) == pa, port=pb, delivered_on=pa)

        self.mask_unmask(a, b, pa, pb)
        self.bind_vcpu(a, b, pa, pb)

        ipis = [p for p in self.xc.list(0) if p["state"] == "ipi"]
        vcpus = sorted({p["vcpu"] for p in ipis})
        self.record("IPI ports as dom0's kernel binds them, one set per vCPU", "EVTCHNOP_bind_ipi",
                    bool(ipis) and vcpus == list(range(len(vcpus))), ipi_ports=len(ipis), vcpus=vcpus)

        self.virq()

        b.reset()  # IOCTL_EVTCHN_RESET: the handle's queue of fired ports is emptied
        a.notify(pa)
        time.sleep(0.2)
        b.reset()
        self.record("handle reset drops queued events", "EVTCHNOP_reset (per handle: IOCTL_EVTCHN_RESET)", b.pending(0.3) == [], port=pb)
        b.unmask(pb)  # the port fired while we reset: let it fire again later

        b.unbind(pb)
        sb, sa = self.status(pb), self.status(pa)
        self.record("close closes the port and leaves the peer unbound", "EVTCHNOP_close",
                    sb["state"] == "closed" and sa["state"] == "unbound" and sa["remote_domid"] == 0, port=pb, status=sb, peer_status=sa)

        self.refusals(a, pa)
        self.restrict()

    def mask_unmask(self, a: EventChannel, b: EventChannel, pa: int, pb: int) -> None:
        # The evtchn driver masks a port when it fires; events sent meanwhile
        # latch as one pending bit, delivered once when we unmask (write the port).
        a.notify(pa)
        first = b.pending(5.0)
        a.notify(pa)
        a.notify(pa)
        while_masked = b.pending(0.5)
        b.unmask(pb)
        after_unmask = b.pending(5.0)
        b.unmask(pb)
        quiet = b.pending(0.5)
        self.record(
            "masked port latches events, unmask delivers them once", "EVTCHNOP_unmask (mask on delivery)",
            first == [pb] and while_masked == [] and after_unmask == [pb] and quiet == [],
            first=first, while_masked=while_masked, after_unmask=after_unmask, after=quiet,
        )

    def bind_vcpu(self, a: EventChannel, h: EventChannel, pa: int, port: int) -> None:
        """Move our port's IRQ to the other vCPU through smp_affinity: the kernel issues EVTCHNOP_bind_vcpu."""
        ncpu = os.cpu_count() or 1
        before = self.status(port)["vcpu"]
        if ncpu < 2:  # a 1-vCPU lab (as PVH and HVM guests under TCG need): not tried, and said so
            self.record("bind_vcpu moves the port", "EVTCHNOP_bind_vcpu", True, not_tried="dom0 has one vCPU: nothing to move to")
            return
        irq = self._irq_of(a, h, pa, port)
        target = 1 - before if before in (0, 1) else 0
        try:
            with open(f"/proc/irq/{irq}/smp_affinity_list", "w") as f:
                f.write(str(target))
        except OSError as e:
            self.record("bind_vcpu moves the port", "EVTCHNOP_bind_vcpu", False, irq=irq, error=str(e))
            return
        # The move is applied when the IRQ next fires (a pending affinity change): fire it.
        a.notify(pa)
        h.wait(port, 2.0)
        time.sleep(0.1)
        after = self.status(port)["vcpu"]
        self.record("bind_vcpu moves the port (via smp_affinity)", "EVTCHNOP_bind_vcpu", after == target, port=port, irq=irq, vcpu_before=before, vcpu_after=after)

    def _irq_of(self, a: EventChannel, h: EventChannel, pa: int, port: int) -> int | None:
        # The IRQ the evtchn driver made for `port`: the one that counts an event sent to it.
        before = _evtchn_irq_counts()
        a.notify(pa)
        h.wait(port, 2.0)
        after = _evtchn_irq_counts()
        changed = [irq for irq, n in after.items() if n != before.get(irq)]
        return changed[0] if len(changed) == 1 else None

    def virq(self) -> None:
        h = self.handle()
        bound = None
        for name in FREE_GLOBAL_VIRQS:
            try:
                bound = (name, h.bind_virq(VIRQS[name]))
                break
            except EvtchnError as e:
                if e.errno != errno.EEXIST:
                    raise
        if bound is None:
            self.record("bind_virq of a free VIRQ", "EVTCHNOP_bind_virq", False, detail=f"all of {FREE_GLOBAL_VIRQS} already bound")
            return
        name, port = bound
        st = self.status(port)
        self.record(f"bind_virq {name} shows the VIRQ", "EVTCHNOP_bind_virq", st["state"] == "virq" and st["virq"] == VIRQS[name], port=port, status=st)
        if name == "con_ring":
            # Xen raises VIRQ_CON_RING when its console ring gets new text: make some.
            subprocess.run(["xl", "debug-keys", "h"], capture_output=True, timeout=30)
            self.record("VIRQ_CON_RING is delivered after Xen console output", "EVTCHNOP_bind_virq (delivery)", h.wait(port, 5.0) == port, port=port)
        self.refused(f"second bind of VIRQ {name}", "EVTCHNOP_bind_virq (refusal)", errno.EEXIST, h.bind_virq, VIRQS[name])
        self.refused("bind of VIRQ_DOM_EXC, already bound by xenstored", "EVTCHNOP_bind_virq (refusal)", errno.EEXIST, h.bind_virq, VIRQS["dom_exc"])
        h.unbind(port)
        self.record(f"unbind VIRQ {name} closes its port", "EVTCHNOP_close", self.status(port)["state"] == "closed", port=port)

    def refusals(self, a: EventChannel, pa: int) -> None:
        c = self.handle()
        self.refused("notify on a port bound elsewhere (the kernel's port 1)", "EVTCHNOP_send (refusal)", errno.ENOTCONN, c.notify, 1)
        self.refused("unbind of a port bound elsewhere (the kernel's port 1)", "EVTCHNOP_close (refusal)", errno.ENOTCONN, c.unbind, 1)
        self.refused("unbind of an invalid port", "EVTCHNOP_close (refusal)", errno.EINVAL, c.unbind, 1 << 20)
        self.refused("bind_interdomain to a port that does not exist", "EVTCHNOP_bind_interdomain (refusal)", errno.EINVAL, c.bind_interdomain, 0, 4000)
        self.refused("bind_interdomain to a nonexistent domain", "EVTCHNOP_bind_interdomain (refusal)", errno.ESRCH, c.bind_interdomain, NO_SUCH_DOMID, 1)
        # A port offered to another domain may not be bound by this one.
        other = a.bind_unbound(NO_SUCH_DOMID)
        st = self.status(other)
        self.record("alloc_unbound for another domain shows it", "EVTCHNOP_alloc_unbound", st["state"] == "unbound" and st["remote_domid"] == NO_SUCH_DOMID, port=other, status=st)
        self.refused("bind to a port offered to another domain", "EVTCHNOP_bind_interdomain (refusal)", errno.EINVAL, c.bind_interdomain, 0, other)
        try:
            self.xc.status(0, 1 << 20)
            self.record("status of an invalid port", "EVTCHNOP_status (refusal)", False, got="succeeded")
        except AgentError as e:
            self.record("status of an invalid port", "EVTCHNOP_status (refusal)", e.errno == errno.EINVAL, got=errno.errorcode.get(e.errno) if e.errno is not None else None)
        a.unbind(other)

    def restrict(self) -> None:
        h = self.handle()
        h.restrict(NO_SUCH_DOMID)
        self.record("restrict limits the handle to one domain", "IOCTL_EVTCHN_RESTRICT_DOMID", True, domid=NO_SUCH_DOMID)
        self.refused("restricted handle: alloc_unbound refused", "EVTCHNOP_alloc_unbound (restricted)", errno.EACCES, h.bind_unbound, 0)
        self.refused("restricted handle: bind to another domain refused", "EVTCHNOP_bind_interdomain (restricted)", errno.EACCES, h.bind_interdomain, 0, 1)
        self.refused("restricted handle: bind_virq refused", "EVTCHNOP_bind_virq (restricted)", errno.EACCES, h.bind_virq, VIRQS["enomem"])

    def close(self) -> list[int]:
        ours = set()
        for h in self.handles:
            ours |= h.ports
            h.close()
        left = [p for p in sorted(ours) if self.xc.status(0, p)["state"] != "closed"]
        self.xc.close()
        return left


def _evtchn_irq_counts() -> dict[int, int]:
    counts = {}
    with open("/proc/interrupts") as f:
        for line in f:
            if "evtchn:" not in line:
                continue
            m = re.match(r"\s*(\d+):((?:\s+\d+)+)", line)
            if m:
                counts[int(m.group(1))] = sum(int(n) for n in m.group(2).split())
    return counts


# -- with a domU peer ----------------------------------------------------------
def offer(peer: int, timeout: float = 120.0) -> dict:
    """dom0 side of the interdomain checks: offer a port to `peer`, print it,
    wait for the domU to bind it and send, then read both ends back."""
    import json

    checks = []
    with Xc() as xc, EventChannel() as h:
        port = h.bind_unbound(peer)
        st = xc.status(0, port)
        checks.append({"check": "alloc_unbound to the domU shows it as remote", "seed_op": "EVTCHNOP_alloc_unbound",
                       "ok": st["state"] == "unbound" and st["remote_domid"] == peer, "status": st})
        print(json.dumps({"port": port}), flush=True)
        got = h.wait(port, timeout)
        st = xc.status(0, port)
        remote = xc.status(peer, st["remote_port"]) if st["state"] == "interdomain" else {}
        checks.append({"check": "the domU's bind_interdomain shows peer dom and port on both ends", "seed_op": "EVTCHNOP_bind_interdomain",
                       "ok": st["state"] == "interdomain" and st["remote_domid"] == peer and remote.get("remote_domid") == 0 and remote.get("remote_port") == port,
                       "status": st, "peer_status": remote})
        checks.append({"check": "event from the domU delivered to dom0", "seed_op": "EVTCHNOP_send", "ok": got == port})
        h.notify(port)
        back = h.wait(port, timeout)  # the domU answers our event with one of its own
        checks.append({"check": "event from dom0 delivered to the domU (it answered)", "seed_op": "EVTCHNOP_send", "ok": back == port})
        h.unbind(port)
        closed = xc.status(0, port)
        remote_after = xc.status(peer, st["remote_port"]) if st["state"] == "interdomain" else {}
        checks.append({"check": "close in dom0 leaves the domU's end unbound", "seed_op": "EVTCHNOP_close",
                       "ok": closed["state"] == "closed" and remote_after.get("state") == "unbound", "status": closed, "peer_status": remote_after})
    return {"peer": peer, "port": port, "checks": checks}


def reset(domid: int) -> dict:
    """EVTCHNOP_reset of a (victim) domU: every port of it closes."""
    with Xc() as xc:
        before = xc.list(domid)
        if domid == 0:
            raise AgentError("refusing to reset dom0's event channels", "give a domU you are about to destroy")
        xc.reset(domid)
        after = xc.list(domid)
    return {"check": "EVTCHNOP_reset closes every port of the domain", "seed_op": "EVTCHNOP_reset", "ok": bool(before) and not after,
            "ports_before": len(before), "ports_after": len(after)}


def main(argv: list[str] | None = None) -> int:
    from .cmdline import run_main

    def run():
        cat = Catalogue()
        try:
            cat.run()
        finally:
            left = cat.close()
        cat.record("nothing left bound after the catalogue", "EVTCHNOP_close", not left, ports_left=left)
        return {"checks": cat.checks, "ok": all(c["ok"] for c in cat.checks)}

    return run_main({"run": run, "offer": offer, "reset": reset}, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
