"""The agent server in dom0: one long-lived process with the agent modules
already imported, which runs each request (`MODULE ARGS`, as
`python3 -m xenlab_agent.MODULE ARGS` would) in a forked child.

Under TCG a new python3 with the agent's imports costs about a second per
command; a fork of this process costs a few hundredths. The host reaches it
through its SSH connection (a direct-tcpip channel to 127.0.0.1:AGENT_SERVER_PORT
in dom0, never a guest-reachable address).

A request is one JSON line {"version", "module", "args", "stdin"} (stdin's
length; its bytes follow). The answer is frames: a type byte, a 4-byte
big-endian length, the payload: first b"A" (taken) or b"V" (this server
runs another agent version; it has stopped listening and ends, and the host
starts the current one), then b"O" stdout, b"E" stderr and last b"X" the
exit code (ASCII).

Each request runs as it would under SSH: its own pid (recorded in
AGENT_RUNNING_DIR/PID as "MODULE ARGS" while it runs), stdin from the request,
and it goes on to its end when the host goes away (its output is then
dropped)."""

from __future__ import annotations

import errno
import fcntl
import importlib
import json
import os
import runpy
import select
import signal
import socket
import struct
import sys
import traceback

from .facts import AGENT_PACKAGE, AGENT_RUNNING_DIR, AGENT_SERVER_PORT

# Imported once by the server: what the host's commands run (a module left out still works, imported per request).
PRELOADED = ("domctl", "blkattach", "blkback", "iocheck", "evtchn", "devchan", "catalogue", "evstatus", "grant", "ring",
             "hostile", "xsprobe", "replug", "backendswap")
HEADER_LIMIT = 1 << 16


def frame(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack(">I", len(payload)) + payload


def _version() -> str:
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "VERSION")) as f:
        return f.read().strip()


def _read_request(conn: socket.socket) -> tuple[dict, bytes]:
    conn.settimeout(30)
    buf = bytearray()
    while b"\n" not in buf:
        piece = conn.recv(4096)
        if not piece or len(buf) > HEADER_LIMIT:
            raise ValueError("no request line")
        buf += piece
    line, _, rest = bytes(buf).partition(b"\n")
    request = json.loads(line)
    stdin = bytearray(rest)
    while len(stdin) < request["stdin"]:
        piece = conn.recv(65536)
        if not piece:
            raise ValueError("request cut short")
        stdin += piece
    conn.settimeout(None)
    return request, bytes(stdin)


def _worker(request: dict, stdin: bytes, out_w: int, err_w: int, running_dir: str) -> None:
    """In the grandchild: become `python3 -m xenlab_agent.MODULE ARGS` and end with its exit code."""
    code = 1
    try:
        try:
            with open(f"{running_dir}/{os.getpid()}", "w") as f:  # the relay removes it
                f.write(" ".join([request["module"], *request["args"]]) + "\n")
        except OSError:
            pass
        stdin_fd = os.memfd_create("stdin")
        os.write(stdin_fd, stdin)
        os.lseek(stdin_fd, 0, os.SEEK_SET)
        os.dup2(stdin_fd, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        for fd in (stdin_fd, out_w, err_w):
            os.close(fd)
        module = f"{AGENT_PACKAGE}.{request['module']}"
        sys.argv = [module, *request["args"]]
        sys.modules.pop(module, None)  # run as __main__ afresh, as `python3 -m` would (and without runpy's warning)
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except KeyboardInterrupt:
            code = 130
        except BaseException:  # noqa: BLE001 - as python3 reports an uncaught exception
            traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def _relay(conn: socket.socket, request: dict, stdin: bytes, running_dir: str) -> None:
    """In the per-request child: run the worker, forward its output as frames, then its exit code."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        conn.close()
        os.close(out_r)
        os.close(err_r)
        _worker(request, stdin, out_w, err_w, running_dir)
    os.close(out_w)
    os.close(err_w)
    host_there = True

    def send(data: bytes) -> None:
        nonlocal host_there
        if host_there:
            try:
                conn.sendall(data)
            except OSError:
                host_there = False  # the host went away: the request runs on, its output is dropped

    open_fds = {out_r: b"O", err_r: b"E"}
    while open_fds:
        ready = select.select(list(open_fds), [], [])[0]
        for fd in ready:
            data = os.read(fd, 65536)
            if data:
                send(frame(open_fds[fd], data))
            else:
                os.close(fd)
                del open_fds[fd]
    status = os.waitpid(pid, 0)[1]
    try:
        os.unlink(f"{running_dir}/{pid}")
    except OSError:
        pass
    code = os.waitstatus_to_exitcode(status)
    send(frame(b"X", str(code if code >= 0 else 128 - code).encode()))


def serve(listener: socket.socket, running_dir: str) -> None:
    version = _version()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the per-request children reap themselves
    while True:
        try:
            conn, _ = listener.accept()
        except InterruptedError:
            continue
        try:
            request, stdin = _read_request(conn)
        except (OSError, ValueError):
            conn.close()
            continue
        if request.get("version") != version:
            listener.close()  # the host starts the current version on this port
            try:
                conn.sendall(frame(b"V", b""))
            except OSError:
                pass
            conn.close()
            return
        try:
            conn.sendall(frame(b"A", b""))
        except OSError:
            conn.close()
            continue
        pid = os.fork()
        if pid == 0:
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the worker's own subprocesses must be waited for
            try:
                _relay(conn, request, stdin, running_dir)
                os._exit(0)
            except BaseException:  # noqa: BLE001 - a relay never returns into the accept loop
                os._exit(1)
        conn.close()


def start(port: int = AGENT_SERVER_PORT, running_dir: str = AGENT_RUNNING_DIR) -> int:
    """Listen on 127.0.0.1:PORT and serve in the background; print "started",
    or "running" when a server already listens there."""
    os.makedirs(running_dir, exist_ok=True)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # SO_REUSEADDR: a new version's server binds over the old one's TIME_WAIT
    # connections. It also lets two starters bind at once, and then both
    # listen() calls fail (seen in the lab): starters take turns under a lock,
    # so a later one finds the port taken and the server running.
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    with open(os.path.join(running_dir, ".start.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            listener.bind(("127.0.0.1", port))
            listener.listen(64)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            listener.close()
            print("running", flush=True)
            return 0
    for name in PRELOADED:
        importlib.import_module(f"{AGENT_PACKAGE}.{name}")
    if os.fork() > 0:
        print("started", flush=True)
        return 0
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    os.chdir(os.path.expanduser("~"))
    try:
        serve(listener, running_dir)
    finally:
        os._exit(0)


if __name__ == "__main__":
    raise SystemExit(start(int(sys.argv[1]) if len(sys.argv) > 1 else AGENT_SERVER_PORT,
                           sys.argv[2] if len(sys.argv) > 2 else AGENT_RUNNING_DIR))
