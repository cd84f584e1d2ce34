"""EVTCHNOP_status for every port of a domain, through libxenctrl
(xc_evtchn_status, what lsevtchn uses), called with ctypes. dom0 only.

`python3 -m xenlab_agent.evstatus ls --domid N` prints the decoded list."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import struct

from .errors import AgentError
from .virq import VIRQ_NAMES

# struct evtchn_status (public/event_channel.h):
#   domid_t dom; evtchn_port_t port; u32 status; u32 vcpu;
#   union { struct { domid_t dom; } unbound;
#           struct { domid_t dom; evtchn_port_t port; } interdomain;
#           u32 pirq; u32 virq; } u;
STATUS_FMT = "=H2xIII8s"
STATUS_SIZE = struct.calcsize(STATUS_FMT)  # 24
STATES = {0: "closed", 1: "unbound", 2: "interdomain", 3: "pirq", 4: "virq", 5: "ipi"}
DOMID_SELF = 0x7FF0
MAX_PORTS = 4096  # 2-level ABI limit for a 64-bit guest; FIFO would allow more, lsevtchn stops at EINVAL too


class StatusError(AgentError):
    pass


def pack_status(dom: int, port: int) -> bytes:
    return struct.pack(STATUS_FMT, dom, port, 0, 0, b"")


def decode_status(buf: bytes) -> dict:
    dom, port, status, vcpu, u = struct.unpack(STATUS_FMT, buf[:STATUS_SIZE])
    entry = {"port": port, "state": STATES.get(status, f"unknown({status})"), "vcpu": vcpu}
    if status == 1:
        entry["remote_domid"] = struct.unpack_from("=H", u)[0]
    elif status == 2:
        rdom, rport = struct.unpack_from("=H2xI", u)
        entry.update(remote_domid=rdom, remote_port=rport)
    elif status == 3:
        entry["pirq"] = struct.unpack_from("=I", u)[0]
    elif status == 4:
        virq = struct.unpack_from("=I", u)[0]
        entry.update(virq=virq, virq_name=VIRQ_NAMES.get(virq, f"arch_{virq - 16}" if virq >= 16 else str(virq)))
    return entry


class Xc:
    def __init__(self):
        name = ctypes.util.find_library("xenctrl") or "libxenctrl.so"
        try:
            self.lib = ctypes.CDLL(name, use_errno=True)
        except OSError as e:
            raise StatusError(f"cannot load libxenctrl ({name}): {e}", "EVTCHNOP_status needs dom0 with xen-utils installed") from None
        self.lib.xc_interface_open.restype = ctypes.c_void_p
        self.lib.xc_interface_open.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
        self.lib.xc_evtchn_status.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.lib.xc_interface_close.argtypes = [ctypes.c_void_p]
        self.xch = self.lib.xc_interface_open(None, None, 0)
        if not self.xch:
            raise StatusError("xc_interface_open failed", "run as root in dom0 (needs /dev/xen/privcmd)")

    def status(self, domid: int, port: int) -> dict:
        buf = ctypes.create_string_buffer(pack_status(domid, port), STATUS_SIZE)
        if self.lib.xc_evtchn_status(self.xch, buf) < 0:
            err = ctypes.get_errno()
            hint = {errno.ESRCH: "no such domain", errno.EINVAL: "no such port in that domain"}.get(err, "")
            raise StatusError(f"EVTCHNOP_status(dom {domid}, port {port}) failed: {errno.errorcode.get(err, err)}", hint, errno_=err)
        return decode_status(buf.raw)

    def list(self, domid: int, include_closed: bool = False) -> list[dict]:
        """Every port from 1 until the domain's first invalid port (EINVAL), as lsevtchn does."""
        ports = []
        try:
            self.status(domid, 0)  # port 0 is always valid (reserved): this only asks whether the domain exists
        except StatusError as e:
            if e.errno == errno.ESRCH:
                raise StatusError(f"domain {domid} does not exist (EVTCHNOP_status: ESRCH)", "check the domid with `xl list`", errno_=e.errno) from None
            raise
        for port in range(1, MAX_PORTS):
            try:
                entry = self.status(domid, port)
            except StatusError as e:
                if e.errno == errno.EINVAL:
                    break
                raise
            if include_closed or entry["state"] != "closed":
                ports.append(entry)
        return ports

    def reset(self, domid: int) -> None:
        """EVTCHNOP_reset: close every event channel of `domid`. Xen refuses
        (EINVAL) unless the toolstack has paused the domain, so pause around it."""
        self._call("xc_domain_pause", domid)
        try:
            self._call("xc_evtchn_reset", domid)
        finally:
            self._call("xc_domain_unpause", domid)

    def _call(self, func: str, domid: int) -> None:
        fn = getattr(self.lib, func)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        if fn(self.xch, domid) < 0:
            err = ctypes.get_errno()
            raise StatusError(f"{func}(dom {domid}) failed: {errno.errorcode.get(err, err)}", errno_=err)

    def close(self) -> None:
        if self.xch:
            self.lib.xc_interface_close(self.xch)
            self.xch = None

    def __enter__(self) -> Xc:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    from .cmdline import run_main

    def ls(domid: int, all: bool = False):  # noqa: A002 - the flag's name
        with Xc() as xc:
            return {"domid": domid, "ports": xc.list(domid, include_closed=all)}

    def status(domid: int, port: int):
        with Xc() as xc:
            return xc.status(domid, port)

    return run_main({"ls": ls, "status": status}, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
