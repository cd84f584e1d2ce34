"""Running agent commands (xenlab.agent) in dom0 over SSH and in a domU over
its console: one-shot calls with a JSON reply, and long-lived dom0
processes whose first output line is a rendezvous (e.g. the port to bind)."""

from __future__ import annotations

import json
import time

from xenlab import deploy
from xenlab.agent.facts import AGENT_PACKAGE, DOMU_AGENT_ROOT
from xenlab.errors import ChannelError, SSHError
from xenlab.lab.ssh import SSHSession

# A command prefix: DOMU_AGENT + "MODULE ARGS" runs an agent module in a python domU.
DOMU_AGENT = f"PYTHONPATH={DOMU_AGENT_ROOT} python3 -m {AGENT_PACKAGE}."


def agent(ssh: SSHSession, module: str, *args: str, timeout: float = 300) -> dict:
    """Run an agent command in dom0; its JSON result, or its error as ChannelError."""
    deploy.ensure_agent(ssh)
    status, out, err = deploy.run_agent(ssh, module, *args, timeout=timeout)
    return deploy.agent_reply(out, err, status, f"{module} {' '.join(args)}", ChannelError)


class Dom0Process:
    """An agent command left running in dom0 (a request of the agent server)."""

    def __init__(self, ssh: SSHSession, module: str, *args: str):
        deploy.ensure_agent(ssh)
        self.call = deploy.AgentCall.start(ssh, module, list(args))
        self.command = self.call.what

    def readline(self, timeout: float) -> dict:
        """The first JSON line (the rendezvous the command prints once it is ready)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.call.stdout:
            if self.call.status is not None:
                raise deploy.agent_error(self.call.stderr.decode(errors="replace"), self.command, self.call.status, ChannelError)
            if time.monotonic() > deadline:
                raise ChannelError(f"dom0 side gave no sign of life within {timeout:.0f} s: {self.command}",
                                   self.call.stderr.decode(errors="replace")[-500:])
            self.call.pump(0.5)
        line, _, rest = bytes(self.call.stdout).partition(b"\n")
        self.call.stdout[:] = rest
        return json.loads(line)

    def wait(self, timeout: float) -> dict:
        try:
            rc = self.call.wait(timeout)
        except deploy.AgentTimeout:
            raise ChannelError(f"dom0 side did not finish within {timeout:.0f} s: {self.command}") from None
        except SSHError as e:
            raise ChannelError(e.message, e.hint) from None
        finally:
            self.call.close()
        return deploy.agent_reply(self.call.stdout.decode(), self.call.stderr.decode(errors="replace"), rc, self.command, ChannelError)


# -- guests ----------------------------------------------------------------------
def domid_of(ssh: SSHSession, guest: str) -> int:
    result = ssh.run(["xl", "domid", guest])
    if not result.ok:
        raise ChannelError(f"no domain named {guest!r} in the lab", "list them with `xenlab guest list`; create one with `xenlab guest create NAME --root python`")
    return int(result.stdout.strip())


def guest_run(guests, guest: str, module_args: str, timeout: float = 300) -> dict:
    """Run an agent command in the domU (foreground, over the console); its JSON result."""
    result = guests.exec(guest, DOMU_AGENT + module_args, timeout=timeout)
    if result.exit_status != 0:
        if "No module named" in result.stderr or "not found" in result.stderr:
            raise ChannelError(f"guest {guest!r} cannot run the agent: {result.stderr.strip()[-300:]}",
                               "create it with `--root python` (python3 and the agent are baked into that root)")
    return deploy.agent_reply(result.stdout, result.stderr, result.exit_status, f"{module_args} in guest {guest}", ChannelError)


def guest_background(guests, guest: str, module_args: str, log: str) -> int:
    """Start an agent command in the domU in the background; its pid."""
    script = f"{DOMU_AGENT}{module_args} > {log} 2>&1 & echo $!"
    result = guests.exec(guest, script, timeout=60)
    if result.exit_status != 0:
        raise ChannelError(f"could not start {module_args!r} in guest {guest}: {result.stderr.strip()[-300:]}")
    return int(result.stdout.strip().splitlines()[-1])


def guests_of(lab):
    from xenlab.guest.manager import Guests

    return Guests(lab)
