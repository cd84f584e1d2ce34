"""`xenlab guest exec` in dom0: a request to the guest's exec agent over its
console (hvc0) and the reply, streamed back in pieces as they come."""

from __future__ import annotations

import base64
import fcntl
import os
import re
import secrets
import select
import sys
import termios
import time
import tty

from .domains import Refused, console_text, domid_of
from .facts import EXEC_CHUNK_TAG, EXEC_END_TAG, EXEC_FRAMED_INPUT, EXEC_REPLY_TAG, EXEC_REQUEST_TAG, LOCK_DIR
from .facts import GUEST_READY_MARK as READY_MARK
from .xs import XenStore

# -- exec over the console ---------------------------------------------------

def exec_in(name: str, script: str, stdin: bytes, timeout: float, on_chunk=None) -> dict:
    """Send one request to the guest's exec agent on hvc0 and wait for its reply.
    Output comes in pieces while the command runs; each goes to
    on_chunk(fd, bytes) when given, and all of it into the result."""
    domid = domid_of(name)
    if domid is None:
        raise Refused(f"no running guest named {name!r}", "see `xenlab guest list`")
    with XenStore() as store:
        tty_path = store.try_read(f"/local/domain/{domid}/console/tty")
    if not tty_path:
        raise Refused(f"guest {name!r} has no console pty (xenconsoled not attached)")
    os.makedirs(LOCK_DIR, exist_ok=True)
    with open(f"{LOCK_DIR}/console-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one request at a time on a console
        fd = os.open(tty_path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            tty.setraw(fd)
            termios.tcflush(fd, termios.TCIFLUSH)
            req_id = secrets.token_hex(6)
            encoded = base64.b64encode(stdin) if stdin else b""
            framed = bool(encoded) and f"{READY_MARK} {name} {EXEC_FRAMED_INPUT}" in console_text(name)
            stdin_field = "-" if not encoded else f"+{len(encoded)}" if framed else encoded.decode()
            frame = f"\n{EXEC_REQUEST_TAG} {req_id} {base64.b64encode(script.encode()).decode()} {stdin_field}\n".encode()
            if framed:
                frame += encoded + b"\n"  # the newline after the input: an empty line the agent skips
            _write_all(fd, frame, timeout)
            # A piece is whole once its line ends; the final reply (from older
            # agents with all the output in it) closes the request.
            answer = re.compile(rf"{EXEC_CHUNK_TAG} {req_id} ([12]) ([A-Za-z0-9+/=]*)[\r\n]|"
                                rf"{EXEC_REPLY_TAG} {req_id} (\d+) ([A-Za-z0-9+/=-]*) ([A-Za-z0-9+/=-]*) {EXEC_END_TAG}".encode())
            output = {1: bytearray(), 2: bytearray()}

            def take(fdno: int, piece: bytes) -> None:
                output[fdno] += piece
                if on_chunk is not None:
                    on_chunk(fdno, piece)

            buf = bytearray()
            deadline = time.monotonic() + timeout
            while True:
                consumed = 0
                for m in answer.finditer(buf):
                    consumed = m.end()
                    if m.group(1):
                        take(int(m.group(1)), base64.b64decode(m.group(2)))
                        continue
                    for fdno, field in ((1, m.group(4)), (2, m.group(5))):
                        if field != b"-" and field:
                            take(fdno, base64.b64decode(field))
                    return {"rc": int(m.group(3)), "stdout": base64.b64encode(output[1]).decode(), "stderr": base64.b64encode(output[2]).decode()}
                del buf[:consumed]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Refused(f"guest {name!r} did not answer within {timeout:.0f} s", "the command may still run; see `xenlab guest console`")
                if select.select([fd], [], [], min(left, 0.5))[0]:
                    try:
                        buf += os.read(fd, 1 << 16)
                    except BlockingIOError:
                        pass
        finally:
            os.close(fd)


def stream_frame(fd: int, piece: bytes) -> None:
    """`exec` with "stream": a piece of output as one line on stdout (O or E, base64)."""
    sys.stdout.write(f"{'O' if fd == 1 else 'E'} {base64.b64encode(piece).decode()}\n")
    sys.stdout.flush()


def _write_all(fd: int, data: bytes, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    view = memoryview(data)
    while view:
        if time.monotonic() > deadline:
            raise Refused("timed out writing the request to the guest console")
        select.select([], [fd], [], 0.5)
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            continue
        view = view[n:]

