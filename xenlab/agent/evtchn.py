"""Event channels from userspace through /dev/xen/evtchn (Linux uapi xen/evtchn.h).

Each ioctl argument is a mutable buffer so fcntl.ioctl copies it in and out;
for the bind calls the kernel returns the new local port as the result.
read() yields fired ports as u32 and the kernel masks a port when it fires;
write() of the port unmasks it again (the evtchn driver re-enables the IRQ).

Run as a module: `python3 -m xenlab_agent.evtchn pingpong|pong|...` (see main)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import struct
import time

from .errors import AgentError, errno_name

DEVICE = "/dev/xen/evtchn"


def _ioc(nr: int, size: int) -> int:
    # _IOC(_IOC_NONE, 'E', nr, size) on x86_64: dir 0, size << 16, type << 8, nr
    return (size << 16) | (ord("E") << 8) | nr


IOCTL_BIND_VIRQ = _ioc(0, 4)          # struct { unsigned int virq; }
IOCTL_BIND_INTERDOMAIN = _ioc(1, 8)   # struct { unsigned int remote_domain, remote_port; }
IOCTL_BIND_UNBOUND_PORT = _ioc(2, 4)  # struct { unsigned int remote_domain; }
IOCTL_UNBIND = _ioc(3, 4)             # struct { unsigned int port; }
IOCTL_NOTIFY = _ioc(4, 4)             # struct { unsigned int port; }
IOCTL_RESET = _ioc(5, 0)              # no argument: empties this handle's ring of fired ports
IOCTL_RESTRICT_DOMID = _ioc(6, 2)     # struct { domid_t domid; }



class EvtchnError(AgentError):
    pass


def _explain(op: str, err: OSError, **what) -> EvtchnError:
    detail = ", ".join(f"{k}={v}" for k, v in what.items())
    hints: dict[int | None, str] = {
        errno.ESRCH: "no such domain: check the domid with `xl list`",
        errno.EINVAL: "the port does not exist, is not bound on this handle, or is not offered to this domain",
        errno.EEXIST: "that VIRQ is already bound on this vCPU (by the kernel or another process)",
        errno.EACCES: "this handle is restricted to another domain (IOCTL_EVTCHN_RESTRICT_DOMID)",
        errno.ENOTCONN: "the port is not bound on this handle",
        errno.ENOENT: "no such port or vCPU",
        errno.EPERM: "not permitted for this domain",
    }
    return EvtchnError(
        f"evtchn {op}({detail}) failed: {errno_name(err.errno)} ({err.strerror})",
        hints.get(err.errno, ""), errno_=err.errno,
    )


class EventChannel:
    """One handle on /dev/xen/evtchn. Every port bound through it is unbound
    when it is closed (also on process exit: the kernel does it on release)."""

    def __init__(self, device: str = DEVICE):
        try:
            self.fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise EvtchnError(f"cannot open {device}: {e.strerror}", "is the xen-evtchn module loaded and are you root?", errno_=e.errno) from None
        self.ports: set[int] = set()
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN)

    def _ioctl(self, op: str, request: int, fmt: str, *values, **what) -> int:
        arg = bytearray(struct.pack(fmt, *values)) if fmt else 0
        try:
            return fcntl.ioctl(self.fd, request, arg) if fmt else fcntl.ioctl(self.fd, request)
        except OSError as e:
            raise _explain(op, e, **what) from None

    # -- binding -----------------------------------------------------------
    def bind_unbound(self, remote_domid: int) -> int:
        """EVTCHNOP_alloc_unbound: a new local port that `remote_domid` may bind."""
        port = self._ioctl("bind_unbound_port", IOCTL_BIND_UNBOUND_PORT, "=I", remote_domid, remote_domid=remote_domid)
        self.ports.add(port)
        return port

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        """EVTCHNOP_bind_interdomain: connect to a port the remote domain offered us."""
        port = self._ioctl(
            "bind_interdomain", IOCTL_BIND_INTERDOMAIN, "=II", remote_domid, remote_port,
            remote_domid=remote_domid, remote_port=remote_port,
        )
        self.ports.add(port)
        return port

    def bind_virq(self, virq: int) -> int:
        """EVTCHNOP_bind_virq on vCPU 0 (the only vCPU the evtchn device binds VIRQs to)."""
        port = self._ioctl("bind_virq", IOCTL_BIND_VIRQ, "=I", virq, virq=virq)
        self.ports.add(port)
        return port

    def unbind(self, port: int) -> None:
        """EVTCHNOP_close through the driver."""
        self._ioctl("unbind", IOCTL_UNBIND, "=I", port, port=port)
        self.ports.discard(port)

    def notify(self, port: int) -> None:
        """EVTCHNOP_send."""
        self._ioctl("notify", IOCTL_NOTIFY, "=I", port, port=port)

    def reset(self) -> None:
        """Empty this handle's queue of fired ports (not EVTCHNOP_reset, which is per domain)."""
        self._ioctl("reset", IOCTL_RESET, "")

    def restrict(self, domid: int) -> None:
        """From now on this handle may only bind interdomain channels to `domid`."""
        self._ioctl("restrict_domid", IOCTL_RESTRICT_DOMID, "=H", domid, domid=domid)

    # -- events ------------------------------------------------------------
    def pending(self, timeout: float | None = None) -> list[int]:
        """Ports that fired (each now masked until unmask()), or [] on timeout."""
        ms = None if timeout is None else max(0, int(timeout * 1000))
        if not self._poll.poll(ms):
            return []
        try:
            data = os.read(self.fd, 4 * 64)
        except BlockingIOError:
            return []
        return list(struct.unpack(f"={len(data) // 4}I", data))

    def wait(self, port: int | None = None, timeout: float | None = None, spin: bool = False) -> int | None:
        """Wait for `port` (or any port) to fire, unmask it and return it; None on timeout.

        spin: poll without sleeping, so this vCPU never blocks in Xen and the
        event needs no scheduler wake-up (lower latency, burns the vCPU)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            for fired in self.pending(0 if spin else left):
                self.unmask(fired)
                if port is None or fired == port:
                    return fired

    def wait_or_watch(self, xs, timeout: float) -> tuple[int, bool]:
        """A backend's sleep: until an event fires (unmasked again here) or a
        XenStore watch of `xs` (agent xs.XenStore) does, or `timeout` passes.
        (events that fired, whether a watch fired); the watch events are consumed."""
        ready, _, _ = select.select([self.fd, xs._fd], [], [], timeout)
        fired = 0
        if self.fd in ready:
            for port in self.pending(0):
                self.unmask(port)
                fired += 1
        watched = False
        if xs._fd in ready or xs.events:
            while xs.wait_watch(0) is not None:
                watched = True
        return fired, watched

    def unmask(self, port: int) -> None:
        try:
            os.write(self.fd, struct.pack("=I", port))
        except OSError as e:
            raise _explain("unmask", e, port=port) from None

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            for port in sorted(self.ports):
                try:
                    fcntl.ioctl(self.fd, IOCTL_UNBIND, bytearray(struct.pack("=I", port)))
                except OSError:
                    pass  # already gone (e.g. the domain was reset); close() releases the rest
            self.ports.clear()
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> EventChannel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- round trips ---------------------------------------------------------------
class _Deadline(Exception):
    pass


def _raise_deadline(signum, frame):
    raise _Deadline()


def _raise_stopped(signum, frame):
    raise EvtchnError(f"stopped by signal {signal.Signals(signum).name}")


def fast_pingpong(ev: EventChannel, port: int, count: int, timeout: float) -> list[float]:
    """The shortest critical path: notify, then a blocking read() (no poll);
    the unmask write happens after the clock stops. One SIGALRM bounds the
    whole run, so a dead peer cannot hang us."""
    samples = []
    old = signal.signal(signal.SIGALRM, _raise_deadline)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    # The loop calls the ioctl directly with its argument packed once: each
    # Python call and allocation in it costs microseconds under TCG.
    fd, clock, ioctl, arg = ev.fd, time.perf_counter, fcntl.ioctl, bytearray(struct.pack("=I", port))
    try:
        for _ in range(count):
            t0 = clock()
            ioctl(fd, IOCTL_NOTIFY, arg)
            fired = os.read(fd, 4)
            samples.append(clock() - t0)
            os.write(fd, fired)
    except OSError as e:
        raise _explain("round trip (notify, read, unmask)", e, port=port) from None
    except _Deadline:
        raise EvtchnError(f"round trips on port {port} did not finish within {timeout:.0f} s ({len(samples)}/{count})", "is the peer still running?") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return samples


def fast_echo(ev: EventChannel, port: int, count: int, timeout: float) -> int:
    """Answer first, unmask after: the reply leaves before our bookkeeping."""
    old = signal.signal(signal.SIGALRM, _raise_deadline)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    fd, ioctl, arg = ev.fd, fcntl.ioctl, bytearray(struct.pack("=I", port))
    done = 0
    try:
        for _ in range(count):
            fired = os.read(fd, 4)
            ioctl(fd, IOCTL_NOTIFY, arg)
            os.write(fd, fired)
            done += 1
    except OSError as e:
        raise _explain("round trip (notify, read, unmask)", e, port=port) from None
    except _Deadline:
        return done
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return count


def pingpong(ev: EventChannel, port: int, count: int, timeout: float = 5.0, spin: bool = False) -> list[float]:
    """Send on `port` and wait for the answer, `count` times; round trips in seconds."""
    samples: list[float] = []
    for _ in range(count):
        t0 = time.perf_counter()
        ev.notify(port)
        if ev.wait(port, timeout, spin) is None:
            raise EvtchnError(f"no answer on port {port} within {timeout} s after {len(samples)} round trips", "is the peer still running?")
        samples.append(time.perf_counter() - t0)
    return samples


def echo(ev: EventChannel, port: int, count: int, timeout: float = 30.0, spin: bool = False) -> int:
    """Answer every event on `port` with one event, `count` times."""
    for n in range(count):
        if ev.wait(port, timeout, spin) is None:
            return n
        ev.notify(port)
    return count


def stats(samples: list[float]) -> dict:
    if not samples:
        return {"count": 0}
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))] * 1e6  # noqa: E731
    return {
        "count": len(s), "mean_us": round(sum(s) / len(s) * 1e6, 1), "min_us": round(s[0] * 1e6, 1),
        "p50_us": round(pick(0.5), 1), "p90_us": round(pick(0.9), 1), "p99_us": round(pick(0.99), 1), "max_us": round(s[-1] * 1e6, 1),
    }


def _current_cpu() -> int:
    with open("/proc/self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[36])  # field 39: the CPU it last ran on


def main(argv: list[str] | None = None) -> int:
    from .cmdline import run_main

    return run_main(_commands(), argv, __doc__)


def _commands():
    import json

    def local_ping(count: int = 2000):
        """Two handles in this domain: alloc unbound + bind interdomain, then ping-pong in one process."""
        with EventChannel() as a, EventChannel() as b:
            pa = a.bind_unbound(0)
            pb = b.bind_interdomain(0, pa)
            b.wait(pb, 1.0)  # bind_interdomain leaves the new local port pending: consume it
            samples = []
            for _ in range(count):
                t0 = time.perf_counter()
                a.notify(pa)
                b.wait(pb, 5.0)
                b.notify(pb)
                a.wait(pa, 5.0)
                samples.append(time.perf_counter() - t0)
        return {"mode": "same-domain, one process", **stats(samples)}

    def ping(remote: int, count: int = 1000, timeout: float = 60.0, warmup: int = 20, spin: bool = False,
             place: bool = False, vcpu: int = 0):
        """Offer a port to `remote`, print it, wait for the peer's hello, then time `count` round trips.
        place: this process, its port's interrupt and dom0 vCPU `vcpu`
        together, alone on a physical CPU (see placement.py); put back afterwards."""
        from .placement import Placement

        placement: Placement | None = None
        if place:
            placement = Placement(remote, vcpu, "xlping")
        else:
            # Stay on one vCPU: under TCG the vCPUs' clocks are not in step, and a
            # migration between two perf_counter() reads distorts (or zeroes) a sample.
            allowed = os.sched_getaffinity(0)
            vcpu = min(allowed) if len(allowed) == 1 else _current_cpu()
            os.sched_setaffinity(0, {vcpu})
        # Terminated or hung up: still leave the with below, which puts the pins back.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _raise_stopped)
        with placement or contextlib.nullcontext(), EventChannel() as ev:
            port = ev.bind_unbound(remote)
            if placement is not None:
                from .evstatus import Xc  # ctypes: present in dom0, not in a python domU's root

                placement.route()
                with Xc() as xc:  # EVTCHNOP_status: the vCPU Xen now delivers the port to
                    placement.report["port_vcpu"] = xc.status(0, port)["vcpu"]
            print(json.dumps({"port": port, "pid": os.getpid()}), flush=True)
            if ev.wait(port, timeout) is None:
                raise EvtchnError(f"domain {remote} never bound port {port} within {timeout:.0f} s", "did the pong side start?")
            run = (lambda k: pingpong(ev, port, k, spin=True)) if spin else (lambda k: fast_pingpong(ev, port, k, timeout))
            run(warmup)
            t0 = time.perf_counter()
            samples = run(count)
            overall = (time.perf_counter() - t0) / count
        placed = placement.report if placement is not None else None
        # overall_mean_us: the whole run over `count`; robust to the PV clock's
        # clamping, which under TCG can make a single short sample read as 0.
        return {"mode": "interdomain" + (", spinning" if spin else ", blocking"), "remote": remote, "port": port,
                "vcpu": vcpu, "placement": placed, **stats(samples), "overall_mean_us": round(overall * 1e6, 1)}

    def pong(remote: int, port: int, count: int = 1020, timeout: float = 60.0, linger: float = 0.0, spin: bool = False):
        """Bind to `remote`:`port`, say hello, answer `count` events, stay bound `linger` s more."""
        with EventChannel() as ev:
            local = ev.bind_interdomain(remote, port)
            ev.wait(local, 0.5)  # the pending bit bind_interdomain sets on our new port
            ev.notify(local)
            answered = echo(ev, local, count, timeout, spin) if spin else fast_echo(ev, local, count, timeout)
            time.sleep(linger)
        return {"local_port": local, "answered": answered}

    return {"local-ping": local_ping, "ping": ping, "pong": pong}


if __name__ == "__main__":
    raise SystemExit(main())
