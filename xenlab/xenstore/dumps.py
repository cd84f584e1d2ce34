"""XenStore dumps and what changed between two of them ("what did the driver
write"): a dump is plain JSON, {path: {"value": str, "perms": ["n0", ...]}}
under a small versioned header, so it can be kept in a file, diffed later
or read by other tools. Bytes that are not UTF-8 are kept as Python's
surrogateescape makes them (JSON "\\udcXX"), so they round-trip."""

from __future__ import annotations

import errno
import json
import re
import time
from fnmatch import fnmatchcase
from pathlib import Path

from xenlab.errors import ConfigError, XenStoreRequestError
from xenlab.xenstore.paths import check_path
from xenlab.xenstore.tree import sanitise, walk_levels

FORMAT = 1

# Nodes ignored by default: none. Nothing in a lab rewrites XenStore on its
# own (no guest agent like xe-daemon refreshing /local/domain/N/data), so
# every change is something a command, a driver or the toolstack did;
# `ignore` takes the user's own noise.
NOISE: tuple[str, ...] = ()

_MAKE_ONE = "make one with `xenlab xs dump [PATH] --out FILE` (or `xenlab xs dump --json > FILE`)"


def read_tree(xs, path: str = "/", *, missing_ok: bool = False) -> dict[str, dict]:
    """{path: {"value", "perms"}} for PATH and every node under it, in
    xenstored's order. A missing PATH is {} with missing_ok, else ENOENT."""
    try:
        walked = list(walk_levels(xs, path, perms=True))
    except XenStoreRequestError as e:
        if missing_ok and e.errno == errno.ENOENT and e.path == path:
            return {}
        raise
    # value None: the node vanished between listing and reading it.
    return {p: {"value": value, "perms": [str(x) for x in node_perms or []]} for p, value, _children, node_perms in walked}


def take(xs, path: str = "/", *, lab: str = "", missing_ok: bool = False) -> dict:
    """A dump document: the header and read_tree(xs, path)."""
    taken = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"format": FORMAT, "lab": lab, "path": path, "taken": taken, "nodes": read_tree(xs, path, missing_ok=missing_ok)}


def save(dump: dict, file: str | Path) -> None:
    try:
        Path(file).write_text(json.dumps(dump, indent=1) + "\n")
    except OSError as e:
        raise ConfigError(f"cannot write dump file {file}: {e.strerror}", "give --out a file in an existing, writable directory") from None


def load(file: str | Path) -> dict:
    """A dump document read from FILE, checked: a missing file, one that is
    not JSON or not a dump is a ConfigError naming it."""
    file = Path(file)
    try:
        text = file.read_text(errors="surrogateescape")
    except FileNotFoundError:
        raise ConfigError(f"dump file {file} does not exist", _MAKE_ONE) from None
    except OSError as e:
        raise ConfigError(f"cannot read dump file {file}: {e.strerror}", _MAKE_ONE) from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not JSON ({e.msg} at line {e.lineno} column {e.colno}), so not a XenStore dump", _MAKE_ONE) from None
    check_dump(doc, str(file))
    return doc


def check_dump(doc, name: str) -> None:
    """Raise ConfigError naming `name` unless doc is a dump this xenlab reads."""
    if isinstance(doc, dict) and "children" in doc and "nodes" not in doc:
        raise ConfigError(f"{name} is an old nested `xs dump --json` tree, not a dump `--diff` can compare", _MAKE_ONE)
    if not isinstance(doc, dict) or "format" not in doc or "nodes" not in doc:
        raise ConfigError(f"{name} is JSON but not a XenStore dump (it has no \"format\" and \"nodes\")", _MAKE_ONE)
    if doc["format"] != FORMAT:
        raise ConfigError(f"{name} is a dump in format {doc['format']!r}; this xenlab reads format {FORMAT}",
                          "dump again with this xenlab (`xenlab xs dump [PATH] --out FILE`), or use the xenlab that wrote it")
    path = doc.get("path", "/")
    if not isinstance(path, str) or not path.startswith("/"):
        raise ConfigError(f"{name}: \"path\" must be an absolute XenStore path, not {path!r}", _MAKE_ONE)
    nodes = doc["nodes"]
    if not isinstance(nodes, dict):
        raise ConfigError(f"{name}: \"nodes\" must be an object of path: {{value, perms}}", _MAKE_ONE)
    for p, node in nodes.items():
        if not (p.startswith("/") and isinstance(node, dict) and isinstance(node.get("value"), (str, type(None)))
                and isinstance(node.get("perms"), list) and all(isinstance(x, str) for x in node["perms"])):
            raise ConfigError(f"{name}: node {p[:200]!r} is not {{\"value\": string, \"perms\": [strings]}}", _MAKE_ONE)


def within(path: str, top: str) -> bool:
    return top == "/" or path == top or path.startswith(top + "/")


def check_covers(dump: dict, path: str, name: str) -> None:
    """A diff under PATH needs a dump of PATH or of one of its ancestors."""
    check_path(path)
    if not within(path, dump["path"]):
        raise ConfigError(f"{name} holds only {dump['path']}, so it cannot show what changed under {path}",
                          f"diff without PATH (it then compares {dump['path']}), or dump {path} again")


def _path_key(path: str) -> list[tuple]:
    # By component, numbers as numbers: /local/domain/2 before /local/domain/10,
    # and a node's children right after it.
    return [(0, int(c), "") if c.isdigit() else (1, 0, c) for c in path.split("/") if c]


def _kept(nodes: dict, under: str | None, ignore: tuple[str, ...] | list[str]) -> dict:
    return {p: n for p, n in nodes.items()
            if (under is None or within(p, under)) and not any(fnmatchcase(p, g) for g in ignore)}


def diff(before: dict[str, dict], after: dict[str, dict], *, under: str | None = None, ignore=NOISE) -> dict:
    """What changed from `before` to `after` (read_tree results): lists of
    added and removed nodes, value changes and permission changes, each
    sorted by path. `under` restricts both to a subtree; `ignore` drops paths
    matching any of its globs (`*` crosses '/')."""
    old, new = _kept(before, under, ignore), _kept(after, under, ignore)
    out: dict[str, list] = {"added": [], "removed": [], "changed": [], "perms": []}
    for p in sorted(old.keys() | new.keys(), key=_path_key):
        if p not in old:
            out["added"].append({"path": p, **new[p]})
        elif p not in new:
            out["removed"].append({"path": p, **old[p]})
        else:
            if old[p]["value"] != new[p]["value"]:
                out["changed"].append({"path": p, "old": old[p]["value"], "new": new[p]["value"]})
            if old[p]["perms"] != new[p]["perms"]:
                out["perms"].append({"path": p, "old": old[p]["perms"], "new": new[p]["perms"]})
    return out


def _quote(value: str | None) -> str:
    return "(unreadable)" if value is None else f'"{sanitise(value)}"'


def _perms(perms: list[str]) -> str:
    return " ".join(perms) or "(none)"


def format_diff(changes: dict) -> list[str]:
    """diff -u light, one line per change, in path order:
    `+ /p = "v"`, `- /p`, `~ /p: "old" -> "new"`, `~ /p perms: n0 -> n0 r5`."""
    lines = []
    for c in changes["added"]:
        lines.append((c["path"], 0, f"+ {c['path']} = {_quote(c['value'])}"))
    for c in changes["removed"]:
        lines.append((c["path"], 0, f"- {c['path']}"))
    for c in changes["changed"]:
        lines.append((c["path"], 1, f"~ {c['path']}: {_quote(c['old'])} -> {_quote(c['new'])}"))
    for c in changes["perms"]:
        lines.append((c["path"], 2, f"~ {c['path']} perms: {_perms(c['old'])} -> {_perms(c['new'])}"))
    return [line for _, _, line in sorted(lines, key=lambda t: (_path_key(t[0]), t[1]))]


def summary(changes: dict) -> str:
    counts = {k: len(v) for k, v in changes.items()}
    if not any(counts.values()):
        return "no changes"
    return f"{counts['added']} added, {counts['removed']} removed, {counts['changed']} changed, {counts['perms']} with new permissions"


_GLOB = re.compile(r"^[A-Za-z0-9_@/*?\[\]!-]+$")


def check_ignore(globs) -> tuple[str, ...]:
    for g in globs:
        if not g.startswith(("/", "*")) or not _GLOB.fullmatch(g):
            raise ConfigError(f"--ignore {g!r} is not a XenStore path glob", "e.g. --ignore '/local/domain/*/data/*' (* crosses '/')")
    return tuple(globs)
