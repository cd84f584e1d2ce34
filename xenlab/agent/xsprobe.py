"""XenStore requests made from inside a domU through its own /dev/xen/xenbus,
answered exactly as xenstored answered them (an error is its errno name,
e.g. "EACCES", not a library's interpretation).

`python3 -m xenlab_agent.xsprobe run --ops JSON`, JSON a list of requests
like ["read", PATH], ["write", PATH, VALUE], ["set-perms", PATH, "n0", ...];
prints per request {"ok": true, "value": ...} or {"ok": false, "error": NAME}."""

from __future__ import annotations

import errno as _errno
import json

from .xs import (
    XS_DIRECTORY,
    XS_GET_DOMAIN_PATH,
    XS_GET_PERMS,
    XS_MKDIR,
    XS_READ,
    XS_RM,
    XS_SET_PERMS,
    XS_WRITE,
    XenStore,
    XsError,
)

OPS = {"ls": XS_DIRECTORY, "read": XS_READ, "get-perms": XS_GET_PERMS, "domain-path": XS_GET_DOMAIN_PATH,
       "write": XS_WRITE, "mkdir": XS_MKDIR, "rm": XS_RM, "set-perms": XS_SET_PERMS}


def payload(op: str, args: list[str]) -> bytes:
    """The request's wire payload: the path NUL-terminated, then a write's raw value or set-perms' entries."""
    data = args[0].encode() + b"\0"
    if op == "write":
        data += args[1].encode()  # a value carries no NUL
    elif op == "set-perms":
        data += b"".join(a.encode() + b"\0" for a in args[1:])
    return data


def answer(store: XenStore, op: str, args: list[str]) -> dict:
    try:
        body = store.request(OPS[op], payload(op, args))
    except XsError as e:
        if e.errno is None:
            return {"ok": False, "error": "TIMEOUT" if "did not answer" in e.message else e.message}
        return {"ok": False, "error": _errno.errorcode.get(e.errno, str(e.errno))}
    if op == "read":
        return {"ok": True, "value": body.decode(errors="replace")}
    return {"ok": True, "value": [p.decode(errors="replace") for p in body.split(b"\0") if p]}


def run(ops: str) -> list[dict]:
    results = []
    with XenStore(timeout=10) as store:
        for op, *args in json.loads(ops):
            results.append({**answer(store, op, args), "request": [op, *args]})
    return results


def main(argv: list[str] | None = None) -> int:
    from .cmdline import run_main

    return run_main({"run": run}, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
