"""XenStore paths, values and permissions: validated on the host, so bad
input fails with a message naming it instead of a protocol error (or, in
pyxs, a bare ValueError)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from xenlab.errors import XenStoreError

# xen/include/public/io/xs_wire.h
PAYLOAD_MAX = 4096
ABS_PATH_MAX = 3072
REL_PATH_MAX = 2048
SPECIAL_WATCHES = ("@introduceDomain", "@releaseDomain")
# A device's state nodes (xenstore-paths.pandoc): the backend's under its
# domain, the frontend's under the guest's.
BACKEND_STATE = re.compile(r"^/local/domain/(\d+)/backend/([\w-]+)/(\d+)/([\w-]+)/state$")
FRONTEND_STATE = re.compile(r"^/local/domain/(\d+)/device/([\w-]+)/([\w-]+)/state$")

_NAME = re.compile(r"^[A-Za-z0-9_@/-]+$")
_PERM = re.compile(r"^([nrwb])(\d+)$")
PERM_NAMES = {"n": "none", "r": "read", "w": "write", "b": "both"}


def encode(text: str) -> bytes:
    # surrogateescape: a value read as bytes that are not UTF-8 writes back unchanged.
    return text.encode("utf-8", "surrogateescape")


def decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def check_path(path: str, *, watch: bool = False) -> str:
    """Return `path` if xenstored would accept it, else raise naming the problem."""
    if not isinstance(path, str):
        raise XenStoreError(f"XenStore path must be a string, not {type(path).__name__}: {path!r}")
    if watch and path in SPECIAL_WATCHES:
        return path
    problem = ""
    if not path:
        problem = "it is empty"
    elif not _NAME.fullmatch(path):
        bad = sorted({c for c in path if not re.match(r"[A-Za-z0-9_@/-]", c)})
        problem = f"it contains {''.join(bad)!r} (allowed: letters, digits, '-', '_', '@', '/')"
    elif "//" in path:
        problem = "it contains '//'"
    elif len(path) > 1 and path.endswith("/"):
        problem = "it ends with '/'"
    elif path.startswith("/") and len(path) > ABS_PATH_MAX:
        problem = f"it is {len(path)} bytes long (absolute paths: at most {ABS_PATH_MAX})"
    elif not path.startswith("/") and len(path) > REL_PATH_MAX:
        problem = f"it is {len(path)} bytes long (relative paths: at most {REL_PATH_MAX})"
    elif path.startswith("@"):
        problem = "only the watch paths " + " and ".join(SPECIAL_WATCHES) + " start with '@'"
    if problem:
        raise XenStoreError(f"invalid XenStore path {path[:200]!r}: {problem}", "paths look like /local/domain/0/name")
    return path


def check_value(path: str, value: str | bytes) -> bytes:
    """The value as bytes, refused if the request would exceed XenStore's payload limit."""
    data = value if isinstance(value, bytes) else encode(value)
    room = PAYLOAD_MAX - len(encode(path)) - 1
    if len(data) > room:
        raise XenStoreError(
            f"value for {path} is {len(data)} bytes; XenStore takes at most {room} here "
            f"({PAYLOAD_MAX} per request, minus the path and its NUL)",
            "store large data elsewhere (a grant page, a file) and put a reference in XenStore",
        )
    return data


@dataclass(frozen=True)
class Perm:
    """One XenStore permission entry: the first names the owner and the
    default for every other domain, the rest are per-domain grants."""

    access: str  # n, r, w or b
    domid: int

    def __str__(self) -> str:
        return f"{self.access}{self.domid}"

    @classmethod
    def parse(cls, text: str) -> Perm:
        m = _PERM.fullmatch(text.strip())
        if not m:
            raise XenStoreError(
                f"invalid XenStore permission {text!r}",
                "write n<domid> (none), r<domid> (read), w<domid> (write) or b<domid> (both), e.g. n0 r5",
            )
        return cls(m.group(1), int(m.group(2)))


def parse_perms(items: list[str] | tuple[str, ...]) -> list[Perm]:
    if not items:
        raise XenStoreError("no permissions given", "the first entry names the owner, e.g. `n0` or `b3 r0`")
    return [Perm.parse(i) for i in items]
