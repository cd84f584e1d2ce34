"""Whole trees: walking, `xenstore-ls` output and JSON dumps.

ls_lines reproduces dom0's `xenstore-ls` (xenstore_client.c, Xen 4.17)
byte for byte: the same order (xenstored's), the same value quoting
(sanitise_value) and, without -f, the same 80-column truncation."""

from __future__ import annotations

from collections.abc import Iterator

from xenlab.errors import XenStoreRequestError
from xenlab.xenstore.paths import Perm, check_path

TAG = ' = "..."'
DEFAULT_WIDTH = 80  # xenstore-ls when stdout is not a terminal


def join(parent: str, name: str) -> str:
    return parent + name if parent.endswith("/") else f"{parent}/{name}"


def sanitise(value: str) -> str:
    """xenstore-ls's quoting: printable ASCII stays, the rest is escaped."""
    out = []
    for byte in value.encode("utf-8", "surrogateescape"):
        c = chr(byte)
        if 0x20 <= byte <= 0x7E and c != "\\":
            out.append(c)
        elif c in "\t\n\r\\":
            out.append({"\t": "\\t", "\n": "\\n", "\r": "\\r", "\\": "\\\\"}[c])
        elif byte < 0o10:
            out.append(f"\\{byte:03o}")
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


def walk_levels(xs, top: str, perms: bool = False) -> Iterator[tuple[str, str | None, list[str], list[Perm] | None]]:
    """Depth-first (path, value, children, perms) under top (top included).
    Fetched one tree level at a time with all requests of a level in flight,
    so a deep tree costs one round trip per level, not per node."""
    check_path(top)
    nodes: dict[str, tuple[str | None, list[str], list[Perm] | None]] = {}
    level = [top]
    while level:
        requests = [(op, p) for p in level for op in (("ls", "read", "get-perms") if perms else ("ls", "read"))]
        answers = iter(xs.batch(requests))
        following: list[str] = []
        for p in level:
            children, value = next(answers), next(answers)
            node_perms = next(answers) if perms else None
            if isinstance(children, XenStoreRequestError):
                if p == top:
                    raise children
                continue  # vanished while walking, as xenstore-ls tolerates
            nodes[p] = (
                None if isinstance(value, XenStoreRequestError) else value,
                children,
                None if isinstance(node_perms, XenStoreRequestError) else node_perms,
            )
            following.extend(join(p, c) for c in children)
        level = following

    def visit(p: str):
        value, children, node_perms = nodes[p]
        yield p, value, children, node_perms
        for c in children:
            if join(p, c) in nodes:
                yield from visit(join(p, c))

    return visit(top)


def ls_lines(xs, path: str = "/", *, full: bool = True, perms: bool = False, width: int = DEFAULT_WIDTH) -> list[str]:
    """The lines `xenstore-ls [-f] [-p] PATH` prints (without their newlines)."""
    lines = []
    for p, value, _children, node_perms in walk_levels(xs, path, perms):
        if p == path:
            continue  # xenstore-ls prints the children of PATH, not PATH itself
        depth = p.count("/") - (0 if path == "/" else path.count("/")) - 1
        name = p.rsplit("/", 1)[1]
        if full:
            line, max_width = p, None
        else:
            line = " " * depth + name[: max(0, width - len(TAG) - depth)]
            max_width = width
        if value is None:
            line += ":"
        else:
            quoted = sanitise(value)
            raw_len = len(value.encode("utf-8", "surrogateescape"))
            if max_width is not None and max_width < len(line) + raw_len + len(TAG):
                line += ' = "' + quoted[: max(0, max_width - len(TAG) - len(line))] + '\\..."'
            else:
                line += f' = "{quoted}"'
                if perms and max_width is not None:
                    # xenstore-ls pads to column 60 with " . . ." when not -f.
                    pad = " "
                    col = len(line) + 1
                    while col < min(60, max_width):
                        pad += "." if col & 1 else " "
                        col += 1
                    line += pad
                elif perms:
                    line += " "
        if perms and node_perms is not None:
            line += "  (" + ",".join(str(x) for x in node_perms) + ")"
        lines.append(line)
    return lines


def dump(xs, path: str = "/") -> dict:
    """The tree under path as JSON-ready nested dicts: value, perms, children."""
    built: dict[str, dict] = {}
    root = None
    for p, value, _children, node_perms in walk_levels(xs, path, perms=True):
        node: dict = {"value": value, "perms": [str(x) for x in node_perms or []], "children": {}}
        built[p] = node
        if root is None:
            root = node
        else:
            parent, name = p.rsplit("/", 1)
            built[parent or "/"]["children"][name] = node
    return {"path": path, **(root or {})}
