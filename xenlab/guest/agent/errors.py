"""The agent's one error type. The host side turns it back into a XenlabError:
the agent prints it as one JSON line on stderr (see cmdline.run_main)."""

from __future__ import annotations

import errno as _errno


class AgentError(Exception):
    def __init__(self, message: str, hint: str = "", errno_: int | None = None):
        super().__init__(message)
        self.message, self.hint, self.errno = message, hint, errno_

    def to_dict(self) -> dict:
        return {
            "error": self.message, "hint": self.hint, "kind": type(self).__name__,
            "errno": _errno.errorcode.get(self.errno) if self.errno else None,
        }

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"
