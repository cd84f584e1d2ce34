"""One error hierarchy: every failure a user can act on carries a hint."""


class XenlabError(Exception):
    """Base error: `message` says what went wrong, `hint` what to do about it."""

    exit_code = 1

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

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
