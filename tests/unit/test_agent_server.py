"""The agent server's protocol (agent/server.py and deploy's client side),
run here on the host: a copy of the agent package as `xenlab_agent` with
one small probe module, the server started as in dom0, and deploy's
request function talking to it over a plain socket."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from xenlab import deploy
from xenlab.agent.facts import AGENT_PACKAGE
from xenlab.errors import SSHError

PROBE = '''
import os, sys
data = sys.stdin.buffer.read()
sys.stdout.write("out:" + data.decode() + ":" + " ".join(sys.argv[1:]) + "\\n")
sys.stderr.write("err:" + str(os.getpid()) + "\\n")
if sys.argv[1:2] == ["raise"]:
    raise ValueError("probe raised")
if sys.argv[1:2] == ["kill"]:
    os.kill(os.getpid(), 9)
if sys.argv[1:2] == ["record"]:
    print(open(os.path.join(sys.argv[2], str(os.getpid()))).read().strip())
sys.exit(int(sys.argv[1]) if sys.argv[1:2] and sys.argv[1].isdigit() else 0)
'''


class _Where:
    where = "127.0.0.1:test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent_copy(tmp_path) -> dict:
    """The agent package as dom0 has it, with the probe module; the environment that runs it."""
    package = tmp_path / AGENT_PACKAGE
    shutil.copytree(deploy.AGENT_SRC, package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "probe.py").write_text(PROBE)
    (package / "VERSION").write_text(deploy.agent_version())
    return {**os.environ, "PYTHONPATH": str(tmp_path)}


def _stop_server(port: int) -> None:
    """A request of another agent version stops the server (and is refused: b"V")."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as chan:
        chan.sendall(json.dumps({"version": "another", "module": "probe", "args": [], "stdin": 0}).encode() + b"\n")
        assert chan.recv(5)[:1] == b"V"


@pytest.fixture
def server(tmp_path):
    env = _agent_copy(tmp_path)
    port, running = _free_port(), tmp_path / "running"
    started = subprocess.run([sys.executable, "-m", f"{AGENT_PACKAGE}.server", str(port), str(running)],
                             env=env, capture_output=True, text=True, timeout=60)
    assert started.stdout.strip() == "started", started.stderr

    def call(*args: str, stdin: bytes = b"", version: str | None = None):
        chan = socket.create_connection(("127.0.0.1", port))
        real = deploy.agent_version
        if version is not None:
            deploy.agent_version = lambda: version  # type: ignore[assignment]
        try:
            request = deploy.AgentCall(_Where(), chan, "probe", list(args))
            if not request._send(stdin):
                return None, "", ""
            status = request.wait(30)
        finally:
            deploy.agent_version = real
            chan.close()
        return status, request.stdout.decode(), request.stderr.decode()

    call.port, call.running, call.env = port, running, env
    yield call
    try:
        _stop_server(port)
    except ConnectionRefusedError:
        pass  # a test stopped it already


def test_a_second_start_finds_it_running(server):
    again = subprocess.run([sys.executable, "-m", f"{AGENT_PACKAGE}.server", str(server.port), str(server.running)],
                           env=server.env, capture_output=True, text=True, timeout=60)
    assert again.stdout.strip() == "running", again.stderr


def test_output_stdin_and_exit_code_come_back_apart(server):
    status, out, err = server("7", "x y", stdin=b"hello")
    assert status == 7
    assert out == "out:hello:7 x y\n"
    assert err.startswith("err:")


def test_each_request_is_a_process_of_its_own_recorded_while_it_runs(server):
    _, out1, err1 = server("record", str(server.running))
    _, _, err2 = server("0")
    assert out1.splitlines()[-1] == f"probe record {server.running}"
    assert err1 != err2  # two pids
    assert [f for f in os.listdir(server.running) if not f.startswith(".")] == []  # records go when the request ends


def test_uncaught_exception_and_signal_give_pythons_exit_codes(server):
    status, _, err = server("raise")
    assert status == 1 and "ValueError: probe raised" in err
    status, _, _ = server("kill")
    assert status == 137


def test_another_version_stops_the_server(server):
    assert server(version="older") == (None, "", "")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
        except OSError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the server still listens after a request of another version")


def test_a_server_gone_mid_request_is_an_error_naming_the_command(server):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    chan = socket.create_connection(listener.getsockname())
    conn, _ = listener.accept()
    conn.close()
    with pytest.raises(SSHError, match="hung up during `probe 0`"):
        deploy.AgentCall(_Where(), chan, "probe", ["0"])._send(b"")
    listener.close()


def test_starters_at_once_leave_one_server_and_all_succeed(tmp_path):
    """Two commands at once may both find no server and both start one: one
    listens, the others say it runs (a test of the lab saw both fail)."""
    env = _agent_copy(tmp_path)
    port, running = _free_port(), str(tmp_path / "running")
    starters = [subprocess.Popen([sys.executable, "-m", f"{AGENT_PACKAGE}.server", str(port), running],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    said = [p.communicate(timeout=60) for p in starters]
    try:
        assert [p.returncode for p in starters] == [0] * 4, said
        assert sorted(out.strip() for out, _ in said) == ["running"] * 3 + ["started"], said
    finally:
        _stop_server(port)
