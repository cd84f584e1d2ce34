"""`xenlab evtchn ...` and `xenlab ring ...`: event channels, the catalogue
and the Python device channel (the library: xenlab.evtchn)."""

from __future__ import annotations

import click

from xenlab.cli.common import emit, lab_option, open_lab
from xenlab.errors import ChannelError
from xenlab.evtchn.catalogue import catalogue, evtchn_ls
from xenlab.evtchn.devchan import devchan
from xenlab.evtchn.ping import ping, placement_text


@click.group()
def evtchn():
    """Event channels: decoded status, round trips, the catalogue of operations."""

@evtchn.command("ls")
@lab_option
@click.argument("domid", type=int)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def ls_cmd(ctx, lab, domid, as_json):
    """EVTCHNOP_status of every port of DOMID, decoded."""
    with open_lab(ctx, lab).ssh() as ssh:
        data = evtchn_ls(ssh, domid)

    def text(d):
        for p in d["ports"]:
            extra = port_peer(p)
            click.echo(f"{p['port']:5d}  vcpu {p['vcpu']}  {p['state']:<11} {extra}")

    emit(data, as_json, text)


def port_peer(p: dict) -> str:
    """What an event channel port is bound to, by its state."""
    if p["state"] == "unbound":
        return f"remote dom {p['remote_domid']}"
    if p["state"] == "interdomain":
        return f"remote dom {p['remote_domid']} port {p['remote_port']}"
    if p["state"] == "virq":
        return f"VIRQ {p['virq']} ({p['virq_name']})"
    if p["state"] == "pirq":
        return f"PIRQ {p['pirq']}"
    return ""

@evtchn.command("ping")
@lab_option
@click.argument("guest")
@click.option("--count", default=1000, show_default=True)
@click.option("--spin", is_flag=True, help="poll instead of blocking on both sides (burns a vCPU each; slower under TCG, where every poll is a syscall)")
@click.option("--placement/--no-placement", default=True, show_default=True,
              help="for the run, give the timing dom0 vCPU a physical CPU of its own, deliver its port's interrupt there "
                   "and pin the domU to the other CPUs (put back afterwards); --no-placement measures the lab as it is")
@click.option("--dom0-vcpu", default=0, show_default=True, help="the dom0 vCPU that times the run (with --placement)")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def ping_cmd(ctx, lab, guest, count, spin, placement, dom0_vcpu, as_json):
    """Event channel round trips between dom0 and GUEST (userspace to userspace)."""
    if count < 1:
        raise ChannelError("--count must be at least 1")
    data = ping(open_lab(ctx, lab), guest, count, spin, placement, dom0_vcpu)
    emit(data, as_json, lambda d: click.echo(
        f"dom0 <-> {guest} (dom {d['domid']}, {d['mode']}, {placement_text(d['placement'])}), {d['count']} round trips: "
        f"mean {d['mean_us']} us, p50 {d['p50_us']} us, p99 {d['p99_us']} us, min {d['min_us']} us, max {d['max_us']} us"))

@evtchn.command("catalogue")
@lab_option
@click.option("--guest", default=None, help="also run the interdomain checks against this domU")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def catalogue_cmd(ctx, lab, guest, as_json):
    """Run every event channel operation (and refusal) and read it back through EVTCHNOP_status."""
    data = catalogue(open_lab(ctx, lab), guest)

    def text(d):
        for c in d["checks"]:
            click.echo(f"{'ok  ' if c['ok'] else 'FAIL'}  {c['seed_op']:<45} {c['check']}")

    emit(data, as_json, text)
    if not data["ok"]:
        raise ChannelError("some event channel checks failed", "rerun with --json for the details of each")

@click.group()
def ring():
    """The Python device channel (shared ring + grants + event channel + XenBus)."""

@ring.command("bench")
@lab_option
@click.argument("guest")
@click.option("--count", default=5000, show_default=True, help="requests")
@click.option("--size", default=2048, show_default=True, help="payload bytes per request (0-4096)")
@click.option("--op", type=click.Choice(["echo", "write", "read", "nop"]), default="echo", show_default=True)
@click.option("--placement/--no-placement", default=True, show_default=True,
              help="for the run, serve from dom0 vCPU 0 alone on a physical CPU with the channel's interrupt there, "
                   "the domU on the other CPUs (put back afterwards)")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def bench_cmd(ctx, lab, guest, count, size, op, placement, as_json):
    """Throughput over the device channel: frontend in GUEST, backend in dom0."""
    if not 0 <= size <= 4096:
        raise ChannelError(f"--size {size} out of range", "a request carries 0 to 4096 bytes (one data page)")
    data = devchan(open_lab(ctx, lab), guest, f"--count {count} --size {size} --op {op}", place=placement)
    if data["backend"]["ended"] != "frontend-closed":
        raise ChannelError(f"the backend ended with {data['backend']['ended']}: {data['backend'].get('error', '')}")
    f = data["frontend"]
    emit(data, as_json, lambda d: click.echo(
        f"{f['requests']} {op} requests of {size} B in {f['seconds']} s: {f['requests_per_s']} req/s, {f['mb_per_s']} MB/s "
        f"(ring {f['ring_size']} slots, full {f['ring_full_seen']} times; backend states {' -> '.join(d['backend']['states'])})"))
