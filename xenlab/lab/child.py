"""A lab's lifecycle (ensure_up, reset, down) run in a child process, for a
long-lived caller such as the pytest plugin's session.

libvirt's embedded driver belongs to the process that opened a lab's root
until that process exits (virt.connect keeps the connection: libvirt cannot
register the embedded driver again more than ~20 times in one process). A
session that booted its lab in its own process kept every other xenlab
command that needs libvirt on that lab (`xenlab debug gdb`, `up`, `down`)
waiting 30 s and failing. In a child, the root is free once the call returns.

    python -m xenlab.lab.child   reads {"config": LabConfig.to_dict(), "op": OP}
                                 on stdin, prints {"result": ...} or {"error": ...}
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from xenlab import errors
from xenlab.config import LabConfig

OPS = ("ensure_up", "reset", "down")
REPLY = "@xenlab-child "  # marks the reply line among anything else printed on stdout


def call(cfg: LabConfig, op: str) -> object:
    """Lab(cfg).OP() in a child process: its result, or its XenlabError raised
    here (same class, message and hint). Interrupted here, the child gets
    SIGINT and undoes what it started, as the command would at Ctrl-C."""
    if op not in OPS:
        raise ValueError(f"unknown lab operation {op!r}")
    request = json.dumps({"config": cfg.to_dict(), "op": op})
    proc = subprocess.Popen([sys.executable, "-m", "xenlab.lab.child"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(request)
    except BaseException:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    replies = [line[len(REPLY):] for line in out.splitlines() if line.startswith(REPLY)]
    if not replies:
        raise errors.LabError(f"`{op}` of lab {cfg.name!r} in a child process ended (exit {proc.returncode}) without a reply:\n"
                              + "\n".join(err.splitlines()[-20:]), "run the same with the CLI (`xenlab up`, `reset`, `down`) to see it")
    reply = json.loads(replies[-1])
    if "error" in reply:
        kind = getattr(errors, reply["error"], None)
        if not (isinstance(kind, type) and issubclass(kind, errors.XenlabError)) or kind.__init__ is not errors.XenlabError.__init__:
            kind = errors.LabError
        raise kind(reply["message"], reply["hint"])
    return reply["result"]


def _main() -> int:
    from xenlab.lab.core import Lab
    from xenlab.progress import Steps

    request = json.load(sys.stdin)
    lab = Lab(LabConfig.from_dict(request["config"]))
    op = request["op"]
    try:
        if op == "ensure_up":
            result: object = lab.ensure_up(Steps(quiet=True))
        elif op == "reset":
            result = lab.reset(Steps(quiet=True))
        elif op == "down":
            result = lab.down()
        else:
            raise errors.ConfigError(f"unknown lab operation {op!r}", f"one of {', '.join(OPS)}")
    except errors.XenlabError as e:
        print(REPLY + json.dumps({"error": type(e).__name__, "message": e.message, "hint": e.hint}))
        return e.exit_code
    print(REPLY + json.dumps({"result": result}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
