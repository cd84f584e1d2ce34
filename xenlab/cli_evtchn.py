"""`xenlab evtchn ...` and `xenlab ring ...`: event channels, the catalogue and
the Python device channel, run by the agent inside dom0 and a domU.

The host only orchestrates: it starts the dom0 side over SSH (a long-lived
channel whose first output line is a rendezvous, e.g. the port to bind), runs
the domU side through the guest's console exec, and collects both JSON
reports. Functions here are also what the e2e tests and bench/ call."""

from __future__ import annotations

import json
import re
import shlex
import time

import click

from .errors import XenlabError
from .guest import deploy
from .orchestrate.ssh import SSHSession

DOMU_AGENT = "PYTHONPATH=/usr/lib/xenlab python3 -m xenlab_agent."


class ChannelError(XenlabError):
    """An event channel, grant or ring operation failed or was refused."""


def agent(ssh: SSHSession, module: str, *args: str, timeout: float = 300) -> dict:
    """Run an agent command in dom0; its JSON result, or its error as ChannelError."""
    deploy.ensure_agent(ssh)
    result = ssh.run(deploy.agent_command(module, *args), timeout=timeout)
    return deploy.agent_reply(result.stdout, result.stderr, result.exit_status, f"{module} {' '.join(args)}", ChannelError)


class Dom0Process:
    """An agent command left running in dom0 over its own SSH channel."""

    def __init__(self, ssh: SSHSession, module: str, *args: str):
        deploy.ensure_agent(ssh)
        self.ssh = ssh
        self.command = deploy.agent_command(module, *args)
        self.chan = ssh.transport().open_session(timeout=10)
        self.chan.exec_command(self.command)
        self.out = b""
        self.err = b""

    def _pump(self, timeout: float) -> bool:
        self.chan.settimeout(timeout)
        got = False
        try:
            if self.chan.recv_ready() or not self.chan.recv_stderr_ready():
                chunk = self.chan.recv(65536)
                self.out += chunk
                got = bool(chunk)
            while self.chan.recv_stderr_ready():
                self.err += self.chan.recv_stderr(65536)
                got = True
        except TimeoutError:
            pass
        except OSError:
            pass
        return got

    def readline(self, timeout: float) -> dict:
        """The first JSON line (the rendezvous the command prints once it is ready)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.out:
            if self.chan.exit_status_ready() and not self.chan.recv_ready():
                self._pump(0.1)
                if b"\n" not in self.out:
                    raise deploy.agent_error(self.err.decode(errors="replace"), self.command, self.chan.recv_exit_status(), ChannelError)
            if time.monotonic() > deadline:
                raise ChannelError(f"dom0 side gave no sign of life within {timeout:.0f} s: {self.command}", self.err.decode(errors="replace")[-500:])
            self._pump(0.5)
        line, _, self.out = self.out.partition(b"\n")
        return json.loads(line)

    def wait(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while not self.chan.exit_status_ready():
            if time.monotonic() > deadline:
                raise ChannelError(f"dom0 side did not finish within {timeout:.0f} s: {self.command}")
            self._pump(0.5)
        while self._pump(0.2):
            pass
        rc = self.chan.recv_exit_status()
        self.chan.close()
        return deploy.agent_reply(self.out.decode(), self.err.decode(errors="replace"), rc, self.command, ChannelError)


# -- guests ----------------------------------------------------------------------
def domid_of(ssh: SSHSession, guest: str) -> int:
    result = ssh.run(["xl", "domid", guest])
    if not result.ok:
        raise ChannelError(f"no domain named {guest!r} in the lab", "list them with `xenlab guest list`; create one with `xenlab guest create NAME --root python`")
    return int(result.stdout.strip())


def guest_run(guests, guest: str, module_args: str, timeout: float = 300) -> dict:
    """Run an agent command in the domU (foreground, over the console); its JSON result."""
    result = guests.exec(guest, DOMU_AGENT + module_args, timeout=timeout)
    if result.exit_status != 0:
        if "No module named" in result.stderr or "not found" in result.stderr:
            raise ChannelError(f"guest {guest!r} cannot run the agent: {result.stderr.strip()[-300:]}",
                               "create it with `--root python` (python3 and the agent are baked into that root)")
    return deploy.agent_reply(result.stdout, result.stderr, result.exit_status, f"{module_args} in guest {guest}", ChannelError)


def guest_background(guests, guest: str, module_args: str, log: str) -> int:
    """Start an agent command in the domU in the background; its pid."""
    script = f"{DOMU_AGENT}{module_args} > {log} 2>&1 & echo $!"
    result = guests.exec(guest, script, timeout=60)
    if result.exit_status != 0:
        raise ChannelError(f"could not start {module_args!r} in guest {guest}: {result.stderr.strip()[-300:]}")
    return int(result.stdout.strip().splitlines()[-1])


def _guests(lab):
    from .guest.manager import Guests

    return Guests(lab)


# -- operations ------------------------------------------------------------------
def evtchn_ls(ssh: SSHSession, domid: int) -> dict:
    return agent(ssh, "evstatus", "ls", "--domid", str(domid))


def ping(lab, guest: str, count: int = 1000, spin: bool = False, place: bool = True, dom0_vcpu: int = 0) -> dict:
    """Event channel round trips between dom0 (timing) and the domU (echoing).
    spin: both sides poll without blocking (no scheduler wake-ups on either side).
    place: the timing process, its vCPU and its port's interrupt together on a
    physical CPU the domU does not use, for the run only (agent placement.py)."""
    with lab.ssh() as ssh, _guests(lab) as guests:
        domid = domid_of(ssh, guest)
        flag = ["--spin"] if spin else []
        proc = Dom0Process(ssh, "evtchn", "ping", "--remote", str(domid), "--count", str(count), *flag,
                           *(["--place", "--vcpu", str(dom0_vcpu)] if place else []))
        port = proc.readline(60)["port"]
        pong = guest_run(guests, guest, f"evtchn pong --remote 0 --port {port} --count {count + 20} {' '.join(flag)}", timeout=120 + count * 0.05)
        result = proc.wait(60)
        result.update(guest=guest, domid=domid, guest_answered=pong["answered"])
        return result


def devchan(lab, guest: str | None, frontend_args: str = "", devid: int = 0, timeout: float = 600, place: bool = False) -> dict:
    """One device channel session: backend in dom0, frontend in `guest` (or in dom0 when None).
    place: the backend on dom0 vCPU 0 alone on a physical CPU, the domU on the others (agent placement.py)."""
    with lab.ssh() as ssh:
        domid = domid_of(ssh, guest) if guest else 0
        backend = Dom0Process(ssh, "devchan", "backend", "--domid", str(domid), "--devid", str(devid), *(["--place"] if place else []))
        backend_pid = backend.readline(60)["pid"]
        try:
            args = f"devchan frontend --devid {devid} {frontend_args}".strip()
            if guest:
                with _guests(lab) as guests:
                    front = guest_run(guests, guest, args, timeout=timeout)
            else:
                front = agent(ssh, *shlex.split(args), timeout=timeout)
        except BaseException:
            _stop(ssh, backend, backend_pid)
            raise
        back = backend.wait(60)
        return {"guest": guest, "domid": domid, "frontend": front, "backend": back}


def devchan_peer_death(lab, guest: str, devid: int = 0, run_seconds: float = 3.0) -> dict:
    """Kill the frontend mid-stream; the backend must notice, unmap and close."""
    with lab.ssh() as ssh, _guests(lab) as guests:
        domid = domid_of(ssh, guest)
        before = _interdomain_ports(ssh, domid)
        mapped_before = grants_mapped(ssh, domid)
        backend = Dom0Process(ssh, "devchan", "backend", "--domid", str(domid), "--devid", str(devid))
        backend_pid = backend.readline(60)["pid"]
        log = f"/tmp/xlchan-fe-{devid}.log"
        pid = guest_background(guests, guest, f"devchan frontend --devid {devid} --count 100000000 --size 256", log)
        deadline = time.monotonic() + 120
        while '"connected"' not in guests.exec(guest, f"cat {log}", timeout=30).stdout:
            if time.monotonic() > deadline:
                _stop(ssh, backend, backend_pid)
                raise ChannelError(f"the frontend in {guest} never connected", f"its log: {guests.exec(guest, f'cat {log}').stdout[-500:]}")
            time.sleep(1)
        time.sleep(run_seconds)
        mapped_during = grants_mapped(ssh, domid)  # proves the dump sees the live mapping
        guests.exec(guest, f"kill -9 {pid}", timeout=30)
        killed_at = time.monotonic()
        back = backend.wait(60)
        back["noticed_after_s"] = round(time.monotonic() - killed_at, 2)
        after = _interdomain_ports(ssh, domid)
        return {
            "guest": guest, "domid": domid, "backend": back, "frontend_pid": pid,
            "dom0_ports_to_guest_before": before, "dom0_ports_to_guest_after": after,
            "guest_grants_mapped_before": mapped_before, "guest_grants_mapped_during": mapped_during, "guest_grants_mapped_after": grants_mapped(ssh, domid), "xenstore_left": _xlchan_nodes(ssh, domid, devid),
        }


def _stop(ssh: SSHSession, proc: Dom0Process, pid: int) -> None:
    """SIGTERM our own dom0 process (by the pid it reported): it unmaps, unbinds and removes its nodes."""
    ssh.run(f"kill -TERM {int(pid)} 2>/dev/null || true")
    try:
        proc.wait(30)
    except XenlabError:
        pass


def _interdomain_ports(ssh: SSHSession, domid: int) -> list[int]:
    return sorted(p["port"] for p in evtchn_ls(ssh, 0)["ports"] if p["state"] == "interdomain" and p.get("remote_domid") == domid)


def _xlchan_nodes(ssh: SSHSession, domid: int, devid: int) -> list[str]:
    left = []
    for path in (f"/local/domain/0/backend/xlchan/{domid}/{devid}", f"/local/domain/{domid}/device/xlchan/{devid}"):
        if ssh.run(["xenstore-exists", path]).ok:
            left.append(path)
    return left


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
    """Every seed-002 check in dom0; with a guest, the interdomain ones against it too."""
    with lab.ssh() as ssh:
        result = agent(ssh, "catalogue", "run", timeout=300)
        checks = result["checks"]
        if guest:
            with _guests(lab) as guests:
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


# -- CLI -------------------------------------------------------------------------
def _lab(ctx, name):
    from .cli import load_config
    from .orchestrate.lab import Lab

    return Lab(load_config(ctx, name=name))


def placement_text(placed: dict | None) -> str:
    if not placed:
        return "as placed by Xen"
    if "skipped" in placed:
        return f"placement skipped: {placed['skipped']}"
    text = f"dom0 vCPU {placed['dom0_vcpu']} alone on pCPU {placed['dom0_vcpu_pcpus']}, domU on pCPU {placed['guest_pcpus']}"
    return text + (f"; NOT restored: {', '.join(placed['not_restored'])}" if placed.get("not_restored") else "")


def _print(data, as_json: bool, text) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        text(data)


def register(main: click.Group) -> None:
    from .cli import name_option

    @main.group()
    def evtchn():
        """Event channels: decoded status, round trips, the seed catalogue."""

    @evtchn.command("ls")
    @name_option
    @click.argument("domid", type=int)
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def ls_cmd(ctx, name, domid, as_json):
        """EVTCHNOP_status of every port of DOMID, decoded."""
        with _lab(ctx, name).ssh() as ssh:
            data = evtchn_ls(ssh, domid)

        def text(d):
            for p in d["ports"]:
                extra = {
                    "unbound": lambda: f"remote dom {p['remote_domid']}",
                    "interdomain": lambda: f"remote dom {p['remote_domid']} port {p['remote_port']}",
                    "virq": lambda: f"VIRQ {p['virq']} ({p['virq_name']})",
                    "pirq": lambda: f"PIRQ {p['pirq']}",
                }.get(p["state"], lambda: "")()
                click.echo(f"{p['port']:5d}  vcpu {p['vcpu']}  {p['state']:<11} {extra}")

        _print(data, as_json, text)

    @evtchn.command("ping")
    @name_option
    @click.argument("guest")
    @click.option("--count", default=1000, show_default=True)
    @click.option("--spin", is_flag=True, help="poll instead of blocking on both sides (burns a vCPU each; slower under TCG, where every poll is a syscall)")
    @click.option("--placement/--no-placement", default=True, show_default=True,
                  help="for the run, give the timing dom0 vCPU a physical CPU of its own, deliver its port's interrupt there "
                       "and pin the domU to the other CPUs (put back afterwards); --no-placement measures the lab as it is")
    @click.option("--dom0-vcpu", default=0, show_default=True, help="the dom0 vCPU that times the run (with --placement)")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def ping_cmd(ctx, name, guest, count, spin, placement, dom0_vcpu, as_json):
        """Event channel round trips between dom0 and GUEST (userspace to userspace)."""
        if count < 1:
            raise ChannelError("--count must be at least 1")
        data = ping(_lab(ctx, name), guest, count, spin, placement, dom0_vcpu)
        _print(data, as_json, lambda d: click.echo(
            f"dom0 <-> {guest} (dom {d['domid']}, {d['mode']}, {placement_text(d['placement'])}), {d['count']} round trips: "
            f"mean {d['mean_us']} us, p50 {d['p50_us']} us, p99 {d['p99_us']} us, min {d['min_us']} us, max {d['max_us']} us"))

    @evtchn.command("catalogue")
    @name_option
    @click.option("--guest", default=None, help="also run the interdomain checks against this domU")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def catalogue_cmd(ctx, name, guest, as_json):
        """Run every seed-002 event channel operation and read it back through EVTCHNOP_status."""
        data = catalogue(_lab(ctx, name), guest)

        def text(d):
            for c in d["checks"]:
                click.echo(f"{'ok  ' if c['ok'] else 'FAIL'}  {c['seed_op']:<45} {c['check']}")

        _print(data, as_json, text)
        if not data["ok"]:
            raise ChannelError("some event channel checks failed", "rerun with --json for the details of each")

    @main.group()
    def ring():
        """The Python device channel (shared ring + grants + event channel + XenBus)."""

    @ring.command("bench")
    @name_option
    @click.argument("guest")
    @click.option("--count", default=5000, show_default=True, help="requests")
    @click.option("--size", default=2048, show_default=True, help="payload bytes per request (0-4096)")
    @click.option("--op", type=click.Choice(["echo", "write", "read", "nop"]), default="echo", show_default=True)
    @click.option("--placement/--no-placement", default=True, show_default=True,
                  help="for the run, serve from dom0 vCPU 0 alone on a physical CPU with the channel's interrupt there, "
                       "the domU on the other CPUs (put back afterwards)")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def bench_cmd(ctx, name, guest, count, size, op, placement, as_json):
        """Throughput over the device channel: frontend in GUEST, backend in dom0."""
        if not 0 <= size <= 4096:
            raise ChannelError(f"--size {size} out of range", "a request carries 0 to 4096 bytes (one data page)")
        data = devchan(_lab(ctx, name), guest, f"--count {count} --size {size} --op {op}", place=placement)
        if data["backend"]["ended"] != "frontend-closed":
            raise ChannelError(f"the backend ended with {data['backend']['ended']}: {data['backend'].get('error', '')}")
        f = data["frontend"]
        _print(data, as_json, lambda d: click.echo(
            f"{f['requests']} {op} requests of {size} B in {f['seconds']} s: {f['requests_per_s']} req/s, {f['mb_per_s']} MB/s "
            f"(ring {f['ring_size']} slots, full {f['ring_full_seen']} times; backend states {' -> '.join(d['backend']['states'])})"))
