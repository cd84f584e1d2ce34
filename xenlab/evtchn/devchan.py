"""The Python device channel (xenlab.agent.devchan) on the real lab: backend
in dom0, frontend in a domU (or dom0), started and collected from the host."""

from __future__ import annotations

import shlex
import time
from contextlib import contextmanager

from xenlab.errors import ChannelError, XenlabError
from xenlab.evtchn.catalogue import _interdomain_ports, grants_mapped
from xenlab.guest.agentrun import Dom0Process, agent, domid_of, guest_background, guest_run, guests_of
from xenlab.lab.ssh import SSHSession


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
                with guests_of(lab) as guests:
                    front = guest_run(guests, guest, args, timeout=timeout)
            else:
                front = agent(ssh, *shlex.split(args), timeout=timeout)
        except BaseException:
            _stop(ssh, backend, backend_pid)
            raise
        back = backend.wait(60)
        return {"guest": guest, "domid": domid, "frontend": front, "backend": back}


class BackendSession:
    """A Python backend serving device xlchan/DEVID of a domU, for a frontend
    of the user's (e.g. a kernel driver). `result` holds the backend's report
    once the session ended."""

    def __init__(self, domid: int, devid: int, nodes: dict):
        self.domid, self.devid = domid, devid
        self.backend_path, self.frontend_path = nodes["backend"], nodes["frontend"]
        self.result: dict | None = None


@contextmanager
def python_backend(lab, guest: str, devid: int = 0, timeout: float = 120, wait: float = 120):
    """Serve device xlchan/DEVID of GUEST with the Python backend in dom0 while
    the body runs (the frontend is the guest's own driver). The backend
    creates the device's XenStore nodes, as a toolstack does, and removes
    them after the closedown. On leaving the block it waits up to `wait`
    seconds for the frontend to close; an exception in the body stops it."""
    with lab.ssh() as ssh:
        domid = domid_of(ssh, guest)
        backend = Dom0Process(ssh, "devchan", "backend", "--domid", str(domid), "--devid", str(devid), "--timeout", str(timeout))
        nodes = backend.readline(60)
        session = BackendSession(domid, devid, nodes)
        try:
            yield session
        except BaseException:
            _stop(ssh, backend, nodes["pid"])
            raise
        session.result = backend.wait(wait)


def devchan_peer_death(lab, guest: str, devid: int = 0, run_seconds: float = 3.0) -> dict:
    """Kill the frontend mid-stream; the backend must notice, unmap and close."""
    with lab.ssh() as ssh, guests_of(lab) as guests:
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
            "guest_grants_mapped_before": mapped_before, "guest_grants_mapped_during": mapped_during,
            "guest_grants_mapped_after": grants_mapped(ssh, domid), "xenstore_left": _xlchan_nodes(ssh, domid, devid),
        }


def _stop(ssh: SSHSession, proc: Dom0Process, pid: int) -> None:
    """SIGTERM our own dom0 process (by the pid it reported): it unmaps, unbinds and removes its nodes."""
    ssh.run(f"kill -TERM {int(pid)} 2>/dev/null || true")
    try:
        proc.wait(30)
    except XenlabError:
        pass


def _xlchan_nodes(ssh: SSHSession, domid: int, devid: int) -> list[str]:
    left = []
    for path in (f"/local/domain/0/backend/xlchan/{domid}/{devid}", f"/local/domain/{domid}/device/xlchan/{devid}"):
        if ssh.run(["xenstore-exists", path]).ok:
            left.append(path)
    return left
