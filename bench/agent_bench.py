"""What dom0's agent server saves, side by side in one run on one lab: each
agent command as a python3 of its own over SSH (`python3 -m xenlab_agent...`,
as xenlab ran them before the server) against the same command through the
agent server (a forked child of one python3 with the agent imported), for
`domctl list` and `domctl exec` of `true` in a running guest, alternated
run by run. Also the library calls a test makes most: guest create and
destroy, exec, console, attach and detach of a Python-backend disk; and
two whole commands against what they cannot do without (issue 33's loop):
`xenlab guest create --disk 64M --net` against dom0's own create of that
guest (its `timings.total`), and `xenlab cp` of a 13 KB file into a guest
against `xenlab ssh -- true`.

Goals (docs/performance.md#the-agent-server): through the server, each
agent command at most 0.5 x its own python3; `guest create` at most 1.5 x
dom0's own create; `cp` at most 1.5 x `ssh -- true`.
Prints one JSON document. Uses lab NAME (default "bench-agent"), booted if
down and then stopped. Usage: .venv/bin/python bench/agent_bench.py [--name LAB] [--runs N]"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lab_bench import host, summary, timed  # noqa: E402

from xenlab import GuestSpec, Lab, deploy  # noqa: E402
from xenlab.progress import Steps  # noqa: E402

GUEST = "bench-agent-g"


def clock(func) -> float:
    start = time.monotonic()
    func()
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", default="bench-agent")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    lab = Lab.open(args.name)
    booted = lab.status()["state"] != "up"
    if booted:
        lab.up(Steps(quiet=True))
    try:
        with lab.guests() as guests, lab.ssh() as ssh:
            if any(row["name"] == GUEST for row in guests.list()):
                guests.destroy(GUEST)
            guest = guests.start(GuestSpec(name=GUEST))
            exec_request = json.dumps({"script": "true", "stdin_b64": "", "timeout": 60}).encode()

            def own_python3(*argv: str, stdin: bytes | None = None) -> None:
                assert ssh.run(deploy.agent_command("domctl", *argv), input=stdin).ok

            def server(*argv: str, stdin: bytes | None = None) -> None:
                assert deploy.run_agent(ssh, "domctl", *argv, input=stdin)[0] == 0

            pairs: dict[str, dict[str, list[float]]] = {"domctl list": {"python3": [], "server": []},
                                                        "domctl exec true": {"python3": [], "server": []}}
            for _ in range(args.runs):
                pairs["domctl list"]["python3"].append(clock(lambda: own_python3("list")))
                pairs["domctl list"]["server"].append(clock(lambda: server("list")))
                pairs["domctl exec true"]["python3"].append(clock(lambda: own_python3("exec", GUEST, stdin=exec_request)))
                pairs["domctl exec true"]["server"].append(clock(lambda: server("exec", GUEST, stdin=exec_request)))
            library: dict[str, list[float]] = {"guest exec": [], "guest console": [], "attach python disk": [], "detach": []}
            for _ in range(args.runs):
                library["guest exec"].append(clock(lambda: guest.exec("true")))
                library["guest console"].append(clock(lambda: guest.console(200)))
                start = time.monotonic()
                disk = guest.attach_disk("8M", backend="python")
                library["attach python disk"].append(time.monotonic() - start)
                library["detach"].append(clock(disk.detach))
            guests.destroy(GUEST)
            lifecycle: dict[str, list[float]] = {"guest create": [], "guest destroy": []}
            for _ in range(max(args.runs // 3, 2)):
                lifecycle["guest create"].append(clock(lambda: guests.start(GuestSpec(name=GUEST))))
                lifecycle["guest destroy"].append(clock(lambda: guests.destroy(GUEST)))
        lab_arg = ["--lab", args.name]
        commands: dict[str, dict[str, list[float]]] = {"guest create": {"command": [], "dom0": []},
                                                       "cp 13 KB into a guest": {"command": [], "ssh -- true": []}}
        with tempfile.NamedTemporaryFile(suffix=".bin") as payload:
            payload.write(os.urandom(13 * 1024))
            payload.flush()
            for _ in range(max(args.runs // 3, 2)):
                took, out = timed("guest", "create", GUEST, *lab_arg, "--disk", "64M", "--net", "--json")
                commands["guest create"]["command"].append(took)
                commands["guest create"]["dom0"].append(json.loads(out)["timings"]["total"])
                commands["cp 13 KB into a guest"]["command"].append(timed("cp", *lab_arg, payload.name, f"{GUEST}:/tmp/")[0])
                commands["cp 13 KB into a guest"]["ssh -- true"].append(timed("ssh", *lab_arg, "--", "true")[0])
                timed("guest", "destroy", GUEST, *lab_arg)
        whole = {}
        for name, (cmd, base) in ((n, tuple(sides.values())) for n, sides in commands.items()):
            whole[name] = {"command_s": summary(cmd), "against_s": summary(base), "against": list(commands[name])[1],
                           "ratio": round(summary(cmd)["median"] / summary(base)["median"], 2)}
        compared = {}
        for name, sides in pairs.items():
            old, new = summary(sides["python3"]), summary(sides["server"])
            compared[name] = {"own_python3_s": old, "server_s": new, "ratio": round(new["median"] / old["median"], 2)}
        print(json.dumps({
            "host": host(), "lab": args.name, "runs": args.runs,
            "agent_commands": compared,
            "whole_commands": whole,
            "goals": {"agent commands: server / own python3 <= 0.5": all(c["ratio"] <= 0.5 for c in compared.values()),
                      "guest create / dom0's create <= 1.5": whole["guest create"]["ratio"] <= 1.5,
                      "cp 13 KB / ssh -- true <= 1.5": whole["cp 13 KB into a guest"]["ratio"] <= 1.5},
            "library_calls_s": {k: summary(v) for k, v in {**library, **lifecycle}.items()},
        }, indent=2))
    finally:
        if booted:
            lab.down()


if __name__ == "__main__":
    main()
