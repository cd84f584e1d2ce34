"""What dom0's agent server saves, side by side in one run on one lab: each
agent command as a python3 of its own over SSH (`python3 -m xenlab_agent...`,
as xenlab ran them before the server) against the same command through the
agent server (a forked child of one python3 with the agent imported), for
`domctl list` and `domctl exec` of `true` in a running guest, alternated
run by run. Also the library calls a test makes most: guest create and
destroy, exec, console, attach and detach of a Python-backend disk.

Goal (docs/performance.md#the-agent-server): through the server, each
command at most half the time of its own python3.
Prints one JSON document. Uses lab NAME (default "bench-agent"), booted if
down and then stopped. Usage: .venv/bin/python bench/agent_bench.py [--name LAB] [--runs N]"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lab_bench import host, summary  # noqa: E402

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
                disk = []
                library["attach python disk"].append(clock(lambda: disk.append(guest.attach_disk("8M", backend="python"))))
                library["detach"].append(clock(lambda: disk[0].detach()))
            guests.destroy(GUEST)
            lifecycle: dict[str, list[float]] = {"guest create": [], "guest destroy": []}
            for _ in range(max(args.runs // 3, 2)):
                lifecycle["guest create"].append(clock(lambda: guests.start(GuestSpec(name=GUEST))))
                lifecycle["guest destroy"].append(clock(lambda: guests.destroy(GUEST)))
        compared = {}
        for name, sides in pairs.items():
            old, new = summary(sides["python3"]), summary(sides["server"])
            compared[name] = {"own_python3_s": old, "server_s": new, "ratio": round(new["median"] / old["median"], 2)}
        print(json.dumps({
            "host": host(), "lab": args.name, "runs": args.runs,
            "agent_commands": compared,
            "goal": "through the server, each command at most 0.5 x its own python3",
            "goal_met": all(c["ratio"] <= 0.5 for c in compared.values()),
            "library_calls_s": {k: summary(v) for k, v in {**library, **lifecycle}.items()},
        }, indent=2))
    finally:
        if booted:
            lab.down()


if __name__ == "__main__":
    main()
