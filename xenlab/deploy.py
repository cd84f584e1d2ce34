"""Copy the agent package (xenlab/agent) into dom0, once per version.

Inside dom0 it is the package `xenlab_agent` under AGENT_ROOT; run a module
with `agent_command("domctl", ...)`. xenlab's hotplug scripts ride along in
AGENT_ROOT/hotplug."""

from __future__ import annotations

import hashlib
import io
import json
import shlex
import struct
import tarfile
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

from xenlab import agent, templates
from xenlab.agent.errors import ERROR_PREFIX
from xenlab.agent.facts import AGENT_PACKAGE, BRIDGE, DOM0_PATH
from xenlab.agent.facts import AGENT_SERVER_PORT as SERVER_PORT
from xenlab.agent.facts import DOM0_AGENT_ROOT as AGENT_ROOT
from xenlab.errors import SSHError, XenlabError

AGENT_SRC = Path(agent.__file__).resolve().parent
HOTPLUG_SCRIPTS = {"block": "hotplug-block.sh.j2", "vif": "hotplug-vif.sh.j2"}


def hotplug_scripts() -> dict[str, str]:
    return {name: templates.render(t, path=DOM0_PATH, bridge=BRIDGE) for name, t in HOTPLUG_SCRIPTS.items()}


def agent_files() -> list[Path]:
    return sorted(p for p in AGENT_SRC.rglob("*.py") if "__pycache__" not in p.parts)


@cache
def agent_version() -> str:
    digest = hashlib.sha256()
    for path in agent_files():
        digest.update(str(path.relative_to(AGENT_SRC)).encode() + b"\0" + path.read_bytes() + b"\0")
    for name, text in sorted(hotplug_scripts().items()):
        digest.update(f"hotplug/{name}\0{text}\0".encode())
    return digest.hexdigest()[:16]


def agent_tarball() -> bytes:
    """The agent package as `xenlab_agent/...` plus its VERSION file."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in agent_files():
            tar.add(path, arcname=f"{AGENT_PACKAGE}/{path.relative_to(AGENT_SRC)}")
        for name, text in hotplug_scripts().items():
            _add_bytes(tar, f"hotplug/{name}", text.encode(), 0o755)
        _add_bytes(tar, f"{AGENT_PACKAGE}/VERSION", agent_version().encode(), 0o644)
    return buf.getvalue()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    tar.addfile(info, io.BytesIO(data))


def agent_command(module: str, *args: str) -> str:
    """Shell command that runs `python3 -m xenlab_agent.MODULE ARGS` in dom0."""
    return f"PYTHONPATH={AGENT_ROOT} python3 -m {AGENT_PACKAGE}.{module} " + shlex.join(args)


def agent_check_command() -> str:
    """Prints 'agent-current' when dom0 has this agent version (for one-round-trip preflights).
    Shell builtins only: every process started in dom0 costs ~0.1 s under TCG."""
    return f"{{ read -r v < {AGENT_ROOT}/{AGENT_PACKAGE}/VERSION; }} 2>/dev/null; [ \"$v\" = {agent_version()} ] && echo agent-current"


def install_agent(ssh) -> None:
    # Under a lock, and only if still needed: two commands at once (two guest
    # creates, say) may both find the agent missing.
    target = f"{AGENT_ROOT}/{AGENT_PACKAGE}"
    ssh.check(f"mkdir -p {AGENT_ROOT} && exec 9> {AGENT_ROOT}/.install.lock && flock 9 && "
              f"if {{ {agent_check_command()}; }} | grep -q agent-current; then cat > /dev/null; "
              f"else rm -rf {target} && tar -x -C {AGENT_ROOT}; fi", input=agent_tarball())


def ensure_agent(ssh) -> None:
    """Install the agent in dom0 unless the same version is there (one round trip when it is)."""
    if "agent-current" not in ssh.run(agent_check_command()).stdout:
        install_agent(ssh)


def run_agent(ssh, module: str, *args: str, input: bytes | None = None, timeout: float = 300.0) -> tuple[int, str, str]:
    """Run an agent module in dom0, as agent_command() would but through the
    agent server (agent/server.py, started on first use): no python3 start
    per command. (exit code, stdout, stderr)."""
    out, err = bytearray(), bytearray()
    status = stream_agent(ssh, module, list(args), input or b"", out.extend, err.extend, timeout)
    return status, out.decode(errors="replace"), err.decode(errors="replace")


def stream_agent(ssh, module: str, args: list[str], stdin: bytes, on_stdout: Callable[[bytes], object],
                 on_stderr: Callable[[bytes], object], timeout: float | None = None) -> int:
    """run_agent() with the output handed over as it comes; the exit code."""
    call = AgentCall.start(ssh, module, args, stdin, on_stdout, on_stderr)
    try:
        return call.wait(timeout)
    finally:
        call.close()


class AgentTimeout(SSHError):
    """An agent command did not finish within its time (AgentCall.wait)."""


class AgentCall:
    """One request to dom0's agent server (the agent must be installed:
    ensure_agent), its output read frame by frame (agent/server.py)."""

    def __init__(self, ssh, chan, module: str, args: list[str], on_stdout: Callable[[bytes], object] | None = None,
                 on_stderr: Callable[[bytes], object] | None = None):
        self.where, self.chan = ssh.where, chan
        self.what = " ".join([module, *args])
        self._module, self._args = module, args
        self.stdout, self.stderr = bytearray(), bytearray()
        self._sinks = {b"O": on_stdout or self.stdout.extend, b"E": on_stderr or self.stderr.extend}
        self.status: int | None = None
        self._answer: bytes | None = None  # b"A" accepted, b"V" another version's server
        self._buf = bytearray()

    @classmethod
    def start(cls, ssh, module: str, args: list[str], stdin: bytes = b"", on_stdout: Callable[[bytes], object] | None = None,
              on_stderr: Callable[[bytes], object] | None = None) -> AgentCall:
        """Send the request, starting the server first when none (or one of another agent version) listens."""
        starts, other_version = 0, False
        for _ in range(4):
            chan = ssh.open_local(SERVER_PORT)
            if chan is None:
                if starts == 2:  # twice: a command starting it at the same time may have lost the race as well
                    break
                _start_server(ssh)
                starts += 1
                continue
            call = cls(ssh, chan, module, args, on_stdout, on_stderr)
            if call._send(stdin):
                return call
            call.close()
            other_version = True
            _start_server(ssh)  # it ran another agent version and has stopped: start this one
            starts += 1
        if other_version:
            raise SSHError(f"dom0's agent server at {ssh.where} keeps changing agent versions: another xenlab, of another "
                           "version, is using this lab at the same time", "use one xenlab per lab, or `xenlab reset` it")
        raise SSHError(f"dom0 at {ssh.where} refused a channel to its agent server (127.0.0.1:{SERVER_PORT})",
                       "the lab's dom0 sshd must allow TCP forwarding (its default); see `xenlab console`")

    def _send(self, stdin: bytes) -> bool:
        header = json.dumps({"version": agent_version(), "module": self._module, "args": self._args, "stdin": len(stdin)})
        try:
            self.chan.sendall(header.encode() + b"\n" + stdin)
        except OSError as e:
            raise SSHError(f"SSH to {self.where} failed sending `{self.what}`: {e}", "is the lab still up? `xenlab status`") from None
        deadline = time.monotonic() + 60
        while self._answer is None:
            if time.monotonic() > deadline:
                raise SSHError(f"dom0's agent server did not take `{self.what}` within 60 s", "is the lab still up? `xenlab status`")
            self.pump(deadline - time.monotonic())
        return self._answer == b"A"

    def pump(self, timeout: float | None) -> bool:
        """Read what arrives within `timeout` seconds (None: wait for something) and hand it on; whether anything came."""
        try:
            self.chan.settimeout(timeout)
            piece = self.chan.recv(65536)
        except TimeoutError:
            return False
        except OSError as e:
            raise SSHError(f"SSH to {self.where} failed running `{self.what}`: {e}", "is the lab still up? `xenlab status`") from None
        if not piece:
            raise SSHError(f"dom0's agent server hung up during `{self.what}`", "is the lab still up? `xenlab status`")
        self._buf += piece
        while len(self._buf) >= 5:
            size = struct.unpack(">I", self._buf[1:5])[0]
            if len(self._buf) < 5 + size:
                break
            kind, payload = bytes(self._buf[:1]), bytes(self._buf[5:5 + size])
            del self._buf[:5 + size]
            if kind in self._sinks:
                self._sinks[kind](payload)
            elif kind == b"X":
                self.status = int(payload)
            else:
                self._answer = kind
        return True

    def wait(self, timeout: float | None) -> int:
        """The exit code, once the command ends (AgentTimeout after `timeout` seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.status is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise AgentTimeout(f"command did not finish within {timeout:.0f} s: {self.what}")
            self.pump(left)
        return self.status

    def close(self) -> None:
        self.chan.close()


def _start_server(ssh) -> None:
    result = ssh.run(agent_command("server", str(SERVER_PORT)), timeout=120)
    if result.exit_status != 0:
        raise SSHError(f"the agent server did not start in dom0 (exit {result.exit_status}): {result.stderr.strip()[-800:]}")


def agent_error(stderr: str, what: str, exit_status: int, error_cls: type[XenlabError]) -> XenlabError:
    """The agent's reported error (errors.report) as `error_cls`, or, when it
    died without reporting one, what it printed."""
    for line in reversed(stderr.splitlines()):
        if line.startswith(ERROR_PREFIX):
            err = json.loads(line[len(ERROR_PREFIX):])
            error = error_cls(err["error"], err.get("hint", ""))
            error.code, error.detail = err.get("code", ""), err.get("detail") or {}
            return error
    return error_cls(f"{what} failed (exit {exit_status}): {stderr.strip()[-1500:]}")


def agent_reply(stdout: str, stderr: str, exit_status: int, what: str, error_cls: type[XenlabError]):
    """An agent command's result: the JSON document on its stdout (the last
    one, when something printed lines before it), or its error raised as `error_cls`."""
    if exit_status != 0:
        raise agent_error(stderr, what, exit_status, error_cls)
    text = stdout.strip()
    try:
        return json.loads(text)
    except ValueError:
        pass
    for line in reversed(text.splitlines()):
        if line.lstrip().startswith(("{", "[")):
            try:
                return json.loads(line)
            except ValueError:
                break
    raise error_cls(f"{what} printed no JSON result", f"its output ends: {text[-300:]!r}; stderr: {stderr.strip()[-300:]!r}")
