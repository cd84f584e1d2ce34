"""XenStore permissions seen from inside a domU: what xenstored lets a guest
do with its own area, dom0's private nodes and another domain's nodes."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

from xenlab.deploy import agent_reply
from xenlab.errors import XenStoreError
from xenlab.guest.agentrun import DOMU_AGENT


def run_in_guest(guests, name: str, ops: list[list[str]], timeout: float = 60) -> list[dict]:
    """Send XenStore requests from guest `name` through its /dev/xen/xenbus
    (the agent's xsprobe); the answers are xenstored's own (an error is its errno name)."""
    result = guests.exec(name, f"{DOMU_AGENT}xsprobe run --ops {shlex.quote(json.dumps(ops))}", timeout=timeout)
    if result.exit_status != 0 and ("python3: not found" in result.stderr or "No module named" in result.stderr):
        raise XenStoreError(f"guest {name!r} has no agent to probe XenStore with", "create it with --root python")
    return agent_reply(result.stdout, result.stderr, result.exit_status, f"the XenStore probe in guest {name!r}", XenStoreError)


@dataclass(frozen=True)
class PermCheck:
    what: str
    request: list[str]
    expected: str  # "ok" or an errno name
    got: str
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.expected == self.got


def check_guest(guests, xs, name: str, domid: int, other_domid: int) -> list[PermCheck]:
    """The guest reads and writes its own area; dom0's private nodes and
    another domain's are refused with xenstored's EACCES (read and write)."""
    own = f"/local/domain/{domid}/data/xenlab-perm-probe"
    private = "/xenlab-private-probe"
    xs.write(private, "dom0 only")
    xs.set_perms(private, ["n0"])  # owner dom0, nobody else
    try:
        plan = [
            ("own area: write", ["write", own, "from-the-guest"], "ok"),
            ("own area: read back", ["read", own], "ok"),
            ("own area: list its domain directory", ["ls", f"/local/domain/{domid}"], "ok"),
            ("dom0's private node: read", ["read", private], "EACCES"),
            ("dom0's private node: write", ["write", private, "x"], "EACCES"),
            ("dom0's own directory: read its name", ["read", "/local/domain/0/name"], "EACCES"),
            ("dom0's own directory: write", ["write", "/local/domain/0/xenlab-perm-probe", "x"], "EACCES"),
            ("dom0's backend directory: list", ["ls", "/local/domain/0/backend"], "EACCES"),
            ("another domain: read its name", ["read", f"/local/domain/{other_domid}/name"], "EACCES"),
            ("another domain: write into its data", ["write", f"/local/domain/{other_domid}/data/xenlab-perm-probe", "x"], "EACCES"),
        ]
        answers = run_in_guest(guests, name, [req for _, req, _ in plan])
        checks = []
        for (what, req, expected), answer in zip(plan, answers, strict=False):
            got = "ok" if answer["ok"] else answer["error"]
            detail = repr(answer.get("value")) if answer["ok"] else ""
            checks.append(PermCheck(what, req, expected, got, detail))
        # What the guest wrote is really there, seen from dom0.
        seen = xs.read(own, None)
        checks.append(PermCheck("own area: the write is visible from dom0", ["read", own], "ok",
                                "ok" if seen == "from-the-guest" else "MISSING", repr(seen)))
        return checks
    finally:
        xs.rm(private)
        xs.rm(own)
