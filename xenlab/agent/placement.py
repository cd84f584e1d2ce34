"""Placement for a latency measurement between a dom0 process and a domU
(dom0 side only: it runs `xl`).

The measuring process, the dom0 vCPU it runs on and the vCPU its event
channel interrupt is delivered to are made one and the same, and that vCPU
gets a physical CPU of its own: the domU and dom0's other vCPUs are pinned
to the remaining ones. Everything is put back afterwards.

Why: under TCG (measured: docs/performance.md) a round trip costs ~280 us placed
this way, but 470-600 us when the event lands on another dom0 vCPU than the
one waiting for it (an extra cross-vCPU wake-up) or when the domU shares the
waiting vCPU's physical CPU (a domain switch per event). Each of those is a
CR3 write, and every CR3 write empties QEMU's software TLB."""

from __future__ import annotations

import os
import subprocess
import sys

from .errors import AgentError
from .xl import parse_xl_info

INTERRUPTS = "/proc/interrupts"


class PlacementError(AgentError):
    pass


def _xl(*args: str) -> str:
    proc = subprocess.run(["xl", *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise PlacementError(f"`xl {' '.join(args)}` failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}",
                             "is the domain still there? (`xl list`)")
    return proc.stdout


def physical_cpus() -> int:
    info = parse_xl_info(_xl("info"))
    if "nr_cpus" in info:
        return int(info["nr_cpus"])
    raise PlacementError("`xl info` printed no nr_cpus line")


def parse_vcpu_list(text: str) -> dict[int, str]:
    """{vcpu: hard affinity as `xl vcpu-pin` takes it} from `xl vcpu-list DOMID`."""
    found = {}
    for line in text.splitlines()[1:]:
        # NAME ID VCPU CPU State Time(s) HARD / SOFT: read from the right, a name may hold spaces
        parts = line.split()
        if len(parts) >= 9 and parts[-2] == "/":
            found[int(parts[-7])] = parts[-3]
    return found


def hard_affinities(domid: int) -> dict[int, str]:
    found = parse_vcpu_list(_xl("vcpu-list", str(domid)))
    if not found:
        raise PlacementError(f"`xl vcpu-list {domid}` listed no vCPU", "check the domid with `xl list`")
    return found


def plan(dom0_vcpus: list[int], guest_vcpus: list[int], measuring_vcpu: int, pcpus: int) -> dict[tuple[int, int], str]:
    """{(domid, vcpu): hard affinity}: the measuring dom0 vCPU alone on
    physical CPU 0, everything else of dom0 and the domU on the others."""
    if measuring_vcpu not in dom0_vcpus:
        raise PlacementError(f"dom0 has no vCPU {measuring_vcpu}", f"dom0's vCPUs: {sorted(dom0_vcpus)}")
    rest = "1" if pcpus == 2 else f"1-{pcpus - 1}"
    pins = {(0, v): ("0" if v == measuring_vcpu else rest) for v in dom0_vcpus}
    return {**pins, **{(-1, v): rest for v in guest_vcpus}}


class Placement:
    """Context manager around one measurement, entered before the process
    opens its evtchn handle: names this process (so its interrupt can be
    found), runs it on dom0 vCPU `vcpu`, pins as `plan` says (the guest
    written as domid -1 there) and, on exit, restores every hard affinity it
    changed. Call route() once the handle's port is bound. `report` says
    what was done, read back from Xen, and on exit what could not be put back."""

    def __init__(self, guest_domid: int, vcpu: int = 0, name: str = "xlplace"):
        self.guest, self.vcpu = guest_domid, vcpu
        self.handle = f"{name}{os.getpid()}"[:15]
        self.saved: dict[tuple[int, int], str] = {}
        self.report: dict = {}

    def __enter__(self) -> Placement:
        name_this_process(self.handle)
        allowed = os.sched_getaffinity(0)
        try:
            os.sched_setaffinity(0, {self.vcpu})
        except OSError:
            raise PlacementError(f"dom0 has no online vCPU {self.vcpu}", f"dom0's vCPUs here: {sorted(allowed)}") from None
        if self.guest == 0:
            self.report = {"skipped": "both ends are in dom0: nothing to separate"}
            return self
        pcpus = physical_cpus()
        if pcpus < 2:
            self.report = {"skipped": f"Xen has {pcpus} physical CPU: nothing to separate"}
            return self
        dom0, guest = hard_affinities(0), hard_affinities(self.guest)
        wanted = plan(sorted(dom0), sorted(guest), self.vcpu, pcpus)
        try:
            for (domid, vcpu), cpus in wanted.items():
                domid = self.guest if domid == -1 else domid
                before = (dom0 if domid == 0 else guest)[vcpu]
                self.saved[(domid, vcpu)] = before
                _xl("vcpu-pin", str(domid), str(vcpu), cpus)
        except BaseException:
            self.restore()
            raise
        # Read back from Xen, not from the plan: this is what the run ran with.
        pinned = {f"0.{v}": cpus for v, cpus in hard_affinities(0).items()}
        pinned.update({f"{self.guest}.{v}": cpus for v, cpus in hard_affinities(self.guest).items()})
        self.report = {"dom0_vcpu": self.vcpu, "dom0_vcpu_pcpus": wanted[(0, self.vcpu)],
                       "guest_pcpus": wanted[(-1, min(guest))], "pinned": pinned}
        return self

    def route(self) -> int:
        """Deliver this process's evtchn interrupt to its vCPU; the IRQ number."""
        self.report["irq"] = route_interrupt(self.handle, self.vcpu)
        return self.report["irq"]

    def restore(self) -> list[str]:
        """Put back what was changed; the ones that could not be (the domain is gone) are named."""
        failed = []
        for (domid, vcpu), cpus in self.saved.items():
            try:
                _xl("vcpu-pin", str(domid), str(vcpu), cpus)
            except (PlacementError, subprocess.TimeoutExpired):
                failed.append(f"{domid}.{vcpu}")
        self.saved.clear()
        return failed

    def __exit__(self, *exc) -> None:
        self.report["not_restored"] = self.restore()
        if self.report["not_restored"]:
            # Also said here: when the measurement failed, no report reaches the host.
            sys.stderr.write(f"placement: could not restore the vCPU affinity of {', '.join(self.report['not_restored'])}\n")


def name_this_process(name: str) -> None:
    """The evtchn driver names a handle's interrupts "evtchn:<comm>" at open;
    a unique comm set before the open lets us find our own interrupt."""
    with open("/proc/self/comm", "w") as f:
        f.write(name[:15])


def route_interrupt(handle_name: str, vcpu: int) -> int:
    """Deliver the interrupt of the evtchn handle opened as `handle_name` to
    `vcpu` (the kernel rebinds the port with EVTCHNOP_bind_vcpu); its IRQ number."""
    with open(INTERRUPTS) as f:
        irqs = [line.split(":", 1)[0].strip() for line in f if line.rstrip().endswith(f"evtchn:{handle_name[:15]}")]
    if len(irqs) != 1:
        raise PlacementError(f"found {len(irqs)} interrupts named evtchn:{handle_name[:15]} in {INTERRUPTS}, expected 1")
    try:
        with open(f"/proc/irq/{irqs[0]}/smp_affinity_list", "w") as f:
            f.write(str(vcpu))
    except OSError as e:
        raise PlacementError(f"cannot route IRQ {irqs[0]} to vCPU {vcpu}: {e.strerror}", "run as root in dom0") from None
    return int(irqs[0])


def hold(argv: list[str]) -> int:
    """`python3 -m xenlab_agent.placement --remote DOMID [--vcpu N] -- CMD ...`:
    run CMD (a measuring program of another language) inside a Placement;
    CMD inherits the pinning to dom0 vCPU N and routes its own interrupt
    there (it names itself and writes /proc/irq, as route_interrupt does)."""
    if "--" not in argv:
        raise PlacementError("usage: placement --remote DOMID [--vcpu N] -- CMD ...")
    opts, cmd = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    values = dict(zip(opts[::2], opts[1::2], strict=False))
    with Placement(int(values["--remote"]), int(values.get("--vcpu", 0))) as placement:
        rc = subprocess.run(cmd).returncode
    sys.stderr.write(f"placement: {placement.report}\n")
    return rc


if __name__ == "__main__":
    from .errors import report

    try:
        raise SystemExit(hold(sys.argv[1:]))
    except AgentError as e:
        raise SystemExit(report(e)) from None
