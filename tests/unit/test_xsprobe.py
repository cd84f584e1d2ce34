"""The in-guest XenStore probe's wire payloads (public/io/xs_wire.h)."""

from xenlab.agent import xsprobe


def test_payloads():
    assert xsprobe.payload("read", ["/local/domain/1/name"]) == b"/local/domain/1/name\0"
    # A written value is raw bytes after the NUL-terminated path, no trailing NUL.
    assert xsprobe.payload("write", ["/a", "v 1"]) == b"/a\0v 1"
    assert xsprobe.payload("set-perms", ["/a", "n0", "r5"]) == b"/a\0n0\0r5\0"


def test_every_op_has_a_wire_type():
    assert set(xsprobe.OPS) == {"ls", "read", "get-perms", "domain-path", "write", "mkdir", "rm", "set-perms"}
    assert len(set(xsprobe.OPS.values())) == len(xsprobe.OPS)
