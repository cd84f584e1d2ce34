"""One error hierarchy: every failure a user can act on carries a hint."""

import errno as errno_mod
import os


class XenlabError(Exception):
    """Base error: `message` says what went wrong, `hint` what to do about it."""

    exit_code = 1

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint
        # Set on an error the dom0 agent reported: its code (agent/errors.py) and data.
        self.code = ""
        self.detail: dict = {}

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ConfigError(XenlabError):
    exit_code = 2


class CommandError(XenlabError):
    """An external command failed; message names argv, exit code and stderr tail."""


class HostError(XenlabError):
    """The host lacks something the lab needs (package, space, memory)."""


class LabError(XenlabError):
    """The lab is in a state that does not allow the operation."""


class BootError(LabError):
    """Xen or dom0 crashed or never became ready during `up`."""


class SSHError(XenlabError):
    pass


class GuestError(XenlabError):
    pass


class XenStoreError(XenlabError):
    pass


class ChannelError(XenlabError):
    """An event channel, grant or ring operation failed or was refused."""


HINTS = {
    errno_mod.ENOENT: "the node does not exist: list its parent with `xenlab xs ls`",
    errno_mod.EACCES: "xenstored refused access: see the node's permissions with `xenlab xs perms PATH`",
    errno_mod.EINVAL: "xenstored rejected the request as invalid (path, value or permissions)",
    errno_mod.E2BIG: "the request is larger than XenStore's 4096-byte payload limit",
    errno_mod.ENOSPC: "a xenstored quota was hit (nodes, size, watches or transactions)",
    errno_mod.EAGAIN: "a conflicting change happened meanwhile; retry the transaction",
}


class XenStoreRequestError(XenStoreError):
    """xenstored answered a request with an error (its errno is kept)."""

    def __init__(self, op: str, path: str, errno: int):
        self.op, self.path, self.errno = op, path, errno
        self.errname = errno_mod.errorcode.get(errno, str(errno))
        super().__init__(f"XenStore {op} {path}: {self.errname} ({os.strerror(errno)})", HINTS.get(errno, ""))


class XenStoreTimeout(XenStoreError):
    pass


class XenStoreConnectionError(XenStoreError):
    pass
