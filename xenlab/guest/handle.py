"""Guest: one running domU, as a handle for scripts and tests."""

from __future__ import annotations

import shlex
from pathlib import Path

from xenlab.errors import GuestError
from xenlab.lab.ssh import CommandResult


class Guest:
    """A running domU: exec(), put(), get(), console(), check(), destroy().

    Everything goes over the guest's Xen console (no network needed); `info`
    is what `Guests.create` reported (domid, devices, timings)."""

    def __init__(self, guests, info: dict):
        self._guests = guests
        self.info = info
        self.name: str = info["name"]
        self.domid: int = info["domid"]
        self.ip: str | None = info["ip"] if info.get("net") else None

    def exec(self, command: str | list[str], input: bytes = b"", timeout: float = 120) -> CommandResult:
        """Run a command in the guest: CommandResult (exit_status, stdout, stderr, ok).
        A string is a shell command line; a list is an argv, run exactly as given."""
        return self._guests.exec(self.name, command, input=input, timeout=timeout)

    def put(self, src: bytes | str | Path, remote: str, mode: int = 0o644) -> None:
        """Copy bytes, or a local file, to `remote` in the guest."""
        data = src if isinstance(src, bytes) else Path(src).read_bytes()
        path = shlex.quote(remote)
        result = self.exec(f"cat > {path} && chmod {mode:o} {path}", input=data)
        if not result.ok:
            raise GuestError(f"could not write {remote} in guest {self.name}: {result.stderr.strip()[-300:]}")

    def get(self, remote: str, local: str | Path | None = None) -> bytes:
        """The content of `remote` in the guest (also written to `local` when given)."""
        rc, data, err = self._guests.exec_bytes(self.name, ["cat", remote])
        if rc != 0:
            raise GuestError(f"could not read {remote} in guest {self.name}: {err.decode(errors='replace').strip()[-300:]}")
        if local is not None:
            Path(local).write_bytes(data)
        return data

    def console(self, lines: int = 100) -> str:
        """The last lines of the guest's console log."""
        return self._guests.console(self.name, lines)["tail"]

    def check(self) -> list[dict]:
        """The block/network ring I/O checks of `xenlab guest check`."""
        return self._guests.check(self.name)

    def attach_disk(self, size: str | int = "16M", backend: str = "kernel", readonly: bool = False,
                    faults: str = "", vdev: str = "", timeout: float = 60, profile: bool = False,
                    own_frontend: bool = False) -> AttachedDisk:
        """A new empty disk, Connected in the guest when this returns (see Guests.attach);
        use it as a context manager to detach it at the end."""
        return AttachedDisk(self, self._guests.attach(self.name, size, backend, readonly, faults, vdev, timeout, profile, own_frontend))

    def destroy(self, timeout: float = 30) -> dict:
        return self._guests.destroy(self.name, timeout=timeout)

    def __repr__(self) -> str:
        return f"Guest({self.name!r}, domid {self.domid})"


class AttachedDisk:
    """A disk attached to a running guest: `device` in the guest (/dev/xvdb),
    `path` of its file in dom0, `backend` (kernel or python). detach() returns
    the backend's report; leaving a `with` block detaches too."""

    def __init__(self, guest: Guest, info: dict):
        self.guest, self.info = guest, info
        self.vdev: str = info["vdev"]
        self.device = f"/dev/{self.vdev}"
        self.path: str = info["path"]
        self.backend: str = info["backend"]
        self.report: dict | None = None

    def detach(self, timeout: float = 30) -> dict:
        if self.report is None:
            self.report = self.guest._guests.detach(self.guest.name, self.vdev, timeout)
        return self.report

    def __enter__(self) -> AttachedDisk:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def __repr__(self) -> str:
        return f"AttachedDisk({self.guest.name!r}, {self.vdev}, {self.backend})"
