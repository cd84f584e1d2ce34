"""XenStore requests made from inside a domU, through its own /dev/xen/xenbus.

This file runs INSIDE the guest (`python3 - OPS_JSON`, sent over `guest
exec`): standard library only. It speaks the raw wire protocol so that an
error is exactly what xenstored answered (its XS_ERROR string, e.g.
"EACCES"), not a library's interpretation. Prints one JSON list: per
request {"ok": true, "value": ...} or {"ok": false, "error": "EACCES"}."""

import json
import os
import select
import struct
import sys
import time

HEADER = struct.Struct("=IIII")
OPS = {"ls": 1, "read": 2, "get-perms": 3, "domain-path": 10, "write": 11, "mkdir": 12, "rm": 13, "set-perms": 14}
XS_WATCH_EVENT, XS_ERROR = 15, 16


def request(fd, rid, op, args, timeout=10.0):
    payload = b"".join(a.encode() + b"\0" for a in args[:1])
    if op == "write":
        payload += args[1].encode()  # a value carries no NUL
    elif op in ("set-perms",):
        payload += b"".join(a.encode() + b"\0" for a in args[1:])
    os.write(fd, HEADER.pack(OPS[op], rid, 0, len(payload)) + payload)
    buf = b""
    deadline = time.monotonic() + timeout
    while True:
        if len(buf) >= HEADER.size:
            mtype, _rid, _tx, length = HEADER.unpack_from(buf)
            if len(buf) >= HEADER.size + length:
                body, buf = buf[HEADER.size:HEADER.size + length], buf[HEADER.size + length:]
                if mtype == XS_WATCH_EVENT:
                    continue
                if mtype == XS_ERROR:
                    return {"ok": False, "error": body.rstrip(b"\0").decode()}
                parts = [p.decode(errors="replace") for p in body.split(b"\0")]
                value = body.decode(errors="replace") if op == "read" else [p for p in parts if p]
                return {"ok": True, "value": value}
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return {"ok": False, "error": "TIMEOUT"}
        chunk = os.read(fd, 65536)
        if not chunk:
            return {"ok": False, "error": "CLOSED"}
        buf += chunk


def main():
    ops = json.loads(sys.argv[1])
    fd = os.open("/dev/xen/xenbus", os.O_RDWR)
    results = []
    for rid, (op, *args) in enumerate(ops, 1):
        result = request(fd, rid, op, args)
        result["request"] = [op, *args]
        results.append(result)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
