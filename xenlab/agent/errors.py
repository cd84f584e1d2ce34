"""The agent's one error type and how every agent command reports it: one
line `XENLAB-AGENT-ERROR {json}` on stderr and exit code 3 (results are JSON
on stdout). The host side (xenlab.deploy.agent_reply) turns it back
into a XenlabError with the same message and hint."""

from __future__ import annotations

import errno as _errno
import json
import sys

ERROR_PREFIX = "XENLAB-AGENT-ERROR "
ERROR_EXIT = 3


# Codes for the refusals the host acts on (not only shows): it matches these,
# never the message's words.
ADDRESS_TAKEN = "address-taken"
CRASHED_STARTING = "crashed-starting"  # detail["core"]: the core taken before the domain went (None: none could be)


class AgentError(Exception):
    def __init__(self, message: str, hint: str = "", errno_: int | None = None, code: str = "", detail: dict | None = None):
        super().__init__(message)
        self.message, self.hint, self.errno = message, hint, errno_
        self.code, self.detail = code, detail or {}

    def to_dict(self) -> dict:
        return {
            "error": self.message, "hint": self.hint, "kind": type(self).__name__,
            "errno": _errno.errorcode.get(self.errno) if self.errno else None,
            "code": self.code, "detail": self.detail,
        }

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


def errno_name(number: int | None) -> str | int | None:
    """An errno's symbolic name (ENOENT), or the number where it has none; None for no errno."""
    return None if number is None else _errno.errorcode.get(number, number)


def report(error: AgentError) -> int:
    """Write `error` the way the host reads it; the exit code to return."""
    sys.stderr.write(ERROR_PREFIX + json.dumps(error.to_dict()) + "\n")
    return ERROR_EXIT


class Stopped(Exception):
    """Raised by raise_stopped, the SIGTERM handler of long-running agent
    commands (backends): the `finally` that closes their device down runs."""


def raise_stopped(signum, frame):
    raise Stopped()
