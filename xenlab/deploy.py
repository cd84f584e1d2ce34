"""Copy the agent package (xenlab/agent) into dom0, once per version.

Inside dom0 it is the package `xenlab_agent` under AGENT_ROOT; run a module
with `agent_command("domctl", ...)`. xenlab's hotplug scripts ride along in
AGENT_ROOT/hotplug."""

from __future__ import annotations

import hashlib
import io
import json
import shlex
import tarfile
from functools import cache
from pathlib import Path

from xenlab import agent, templates
from xenlab.agent.errors import ERROR_PREFIX
from xenlab.agent.facts import AGENT_PACKAGE, BRIDGE, DOM0_PATH
from xenlab.agent.facts import DOM0_AGENT_ROOT as AGENT_ROOT
from xenlab.errors import XenlabError

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
