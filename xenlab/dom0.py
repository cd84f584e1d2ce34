"""Dom0: commands, files and XenStore in the lab's dom0, over one SSH
connection that is reopened when it dropped."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from xenlab.lab.ssh import CommandResult, SSHSession
from xenlab.xenstore.client import XenStore

if TYPE_CHECKING:
    from xenlab.lab.core import Lab


class Dom0:
    """dom0 of a lab: run(), check(), put(), get(), and `xs` (XenStore)."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self._ssh: SSHSession | None = None
        self._xs: XenStore | None = None

    @property
    def ssh(self) -> SSHSession:
        if self._ssh is None or not self._ssh.active:
            self._ssh = self.lab.ssh()
        return self._ssh

    def run(self, command: str | list[str], timeout: float = 120, input: bytes | None = None) -> CommandResult:
        """CommandResult (command, exit_status, stdout, stderr, ok); never raises on a non-zero exit."""
        return self.ssh.run(command, timeout=timeout, input=input)

    def check(self, command: str | list[str], timeout: float = 120, input: bytes | None = None) -> str:
        """stdout; SSHError naming the command, exit code and stderr on failure."""
        return self.ssh.check(command, timeout=timeout, input=input)

    def put(self, src: bytes | str | Path, remote: str, mode: int = 0o644) -> None:
        """Copy bytes, or a local file (str/Path), to `remote` in dom0."""
        data = src if isinstance(src, bytes) else Path(src).read_bytes()
        self.ssh.put(data, remote, mode)

    def get(self, remote: str, local: str | Path | None = None) -> bytes:
        """The content of `remote` in dom0 (also written to `local` when given)."""
        data = self.ssh.get(remote)
        if local is not None:
            Path(local).write_bytes(data)
        return data

    @property
    def xs(self) -> XenStore:
        """XenStore on dom0's xenstored (read, write, ls, rm, watch, transaction, ...)."""
        if self._xs is None or not self._xs.connected:
            self._xs = XenStore.for_lab(self.lab, timeout=30)
        return self._xs

    def close(self) -> None:
        for thing in (self._xs, self._ssh):
            if thing is not None:
                thing.close()
        self._xs = self._ssh = None

    def __enter__(self) -> Dom0:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Dom0(lab {self.lab.name!r})"
