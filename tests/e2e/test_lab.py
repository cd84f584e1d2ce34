"""The foundation on the real lab: up, Xen 4.17, XenStore, /dev/xen, status, ssh, down."""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
from pathlib import Path

import pytest

from xenlab.agent.xl import parse_xl_info
from xenlab.run import pid_alive

from .conftest import LAB, XENLAB, lab_prerequisites, xenlab


@pytest.mark.gate
def test_up_reports_ready_lab(lab_info):
    assert lab_info["name"] == LAB
    assert lab_info["accel"] in ("kvm", "tcg")
    assert 1024 <= lab_info["ssh_port"] <= 65535
    assert pid_alive(lab_info["qemu_pid"])
    # Booted cold (and saved as a snapshot), or restored from one.
    steps = ["restore snapshot", "dom0 answers (clock set)", "snapshot digest"]
    if not lab_info["restored"] or lab_info["snapshot"]["saved_now"]:
        steps += ["boot Xen and dom0", "SSH and dom0 services"]
    for step in steps:
        assert any(step in name for name in lab_info["timings"]), (step, lab_info["timings"])


@pytest.mark.gate
def test_xl_info_shows_xen_417(dom0):
    info = parse_xl_info(dom0("xl info").stdout)
    assert (info["xen_major"], info["xen_minor"]) == ("4", "17")
    assert "xen-3.0-x86_64" in info["xen_caps"]


@pytest.mark.gate
def test_xenstore_answers(dom0):
    value = secrets.token_hex(8)
    dom0(f"xenstore-write /local/domain/0/data/e2e {value}")
    assert dom0("xenstore-read /local/domain/0/data/e2e").stdout.strip() == value
    assert dom0("xenstore-read /local/domain/0/name").stdout.strip() == "Domain-0"


@pytest.mark.gate
def test_dev_xen_devices_exist(dom0):
    listing = set(dom0("ls /dev/xen").stdout.split())
    assert {"evtchn", "gntdev", "gntalloc", "privcmd", "xenbus"} <= listing
    procs = dom0("pgrep -x xenstored; pgrep -x xenconsoled").stdout.split()
    assert len(procs) == 2


@pytest.mark.gate
def test_ssh_passes_output_and_exit_code(lab_info):
    result = xenlab("ssh", "--name", LAB, "--", "echo out; echo err >&2; exit 7", check=False)
    assert (result.returncode, result.stdout, result.stderr) == (7, "out\n", "err\n")


@pytest.mark.gate
def test_ssh_is_only_on_loopback(lab_info):
    with socket.create_connection(("127.0.0.1", lab_info["ssh_port"]), timeout=5) as s:
        assert s.recv(64).startswith(b"SSH-2.0-")
    cmdline = open(f"/proc/{lab_info['qemu_pid']}/cmdline").read().replace("\0", " ")
    assert f"hostfwd=tcp:127.0.0.1:{lab_info['ssh_port']}-:22" in cmdline and "restrict=on" in cmdline


@pytest.mark.gate
def test_status_reports_the_truth(lab_info, dom0):
    status = json.loads(xenlab("status", "--name", LAB, "--json").stdout)
    assert status["state"] == "up"
    assert status["xen_version"].startswith("4.17")
    assert status["ssh_port"] == lab_info["ssh_port"] and status["accel"] == lab_info["accel"]
    assert status["image_id"] == lab_info["image_id"]
    # dom0's size as Xen sees it matches what the config asked for.
    assert status["dom0"] == {"memory_mib": lab_info["config"]["dom0"]["memory"], "vcpus": lab_info["config"]["dom0"]["vcpus"]}
    xl_names = dom0("xl list").stdout
    assert [d["name"] for d in status["domains"]] == [line.split()[0] for line in xl_names.splitlines()[1:]]
    assert 0 < status["uptime_seconds"] < 3600


@pytest.mark.gate
def test_up_of_a_lab_already_up_is_a_no_op_unless_it_asks_for_another_configuration(lab_info):
    again = xenlab("up", "--name", LAB, "--json")  # `xenlab up && pytest` scripts may run it twice
    assert json.loads(again.stdout)["qemu_pid"] == lab_info["qemu_pid"]
    assert f"lab {LAB} is already up (SSH on 127.0.0.1:{lab_info['ssh_port']}): nothing to do" in again.stderr
    memory = lab_info["config"]["memory"]
    other = xenlab("up", "--name", LAB, "--memory", f"{memory + 512}M", check=False)
    assert other.returncode != 0, other.stdout
    assert f"is already up with another configuration (memory: {memory} -> {memory + 512})" in other.stderr, other.stderr
    assert pid_alive(lab_info["qemu_pid"])  # the running lab is untouched


@pytest.mark.gate
def test_port_in_use_is_refused_and_leaves_nothing(lab_info):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = xenlab("up", "--name", "e2e-port", "--ssh-port", str(port), check=False)
    assert result.returncode != 0 and f"127.0.0.1:{port} is already in use" in result.stderr
    assert json.loads(xenlab("status", "--name", "e2e-port", "--json").stdout)["state"] == "down"
    assert not (Path(lab_info["state_dir"]).parent / "e2e-port").exists()


@pytest.mark.gate
def test_bad_uri_is_refused(lab_info):
    result = xenlab("up", "--name", "e2e-uri", "--connect", "nosuchdriver:///system", check=False)
    assert result.returncode != 0 and "cannot connect to libvirt at nosuchdriver:///system" in result.stderr
    assert not (Path(lab_info["state_dir"]).parent / "e2e-uri").exists()


@pytest.mark.gate
def test_console_names_and_tails_the_serial_log(lab_info):
    # Guests created by earlier tests add Xen log lines: ask for the whole log.
    out = xenlab("console", "--name", LAB, "-n", "1000000").stdout
    assert out.startswith(f"serial log: {lab_info['serial_log']}\n") and "XENLAB-READY" in out
    # The last 3 lines as in the file (dom0's console ends lines with \r\r\n: compare without \r).
    raw = subprocess.run(XENLAB + ["console", "--name", LAB, "-n", "3"], capture_output=True, check=True).stdout
    tail = raw.decode(errors="replace").replace("\r", "").split("\n", 1)[1]
    on_disk = Path(lab_info["serial_log"]).read_bytes().decode(errors="replace").replace("\r", "")
    assert tail.count("\n") == 3 and on_disk.endswith(tail), (tail, on_disk[-300:])


@pytest.mark.full
def test_two_labs_side_by_side(lab_info):
    try:
        other = json.loads(xenlab("up", "--name", "e2e-b", "--json").stdout)
        assert other["ssh_port"] != lab_info["ssh_port"] and other["state_dir"] != lab_info["state_dir"]
        assert xenlab("ssh", "--name", "e2e-b", "--", "hostname").stdout.strip() == "xenlab-dom0"
        assert json.loads(xenlab("status", "--name", LAB, "--json").stdout)["state"] == "up"
    finally:
        xenlab("down", "--name", "e2e-b", check=False)
    assert not pid_alive(other["qemu_pid"])


@pytest.mark.gate
def test_down_leaves_nothing_and_is_idempotent(lab_info):
    """On a lab of its own (restored from the session lab's snapshot), so the
    session lab stays up for the tests that run after this one."""
    name = "e2e-down"
    xenlab("down", "--name", name, check=False)
    info = json.loads(xenlab("up", "--name", name, "--json").stdout)
    try:
        first = json.loads(xenlab("down", "--name", name, "--json").stdout)
        assert first["was_running"] is True
        assert not pid_alive(info["qemu_pid"])
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", info["ssh_port"])) != 0
        assert json.loads(xenlab("status", "--name", name, "--json").stdout)["state"] == "down"
        second = json.loads(xenlab("down", "--name", name, "--json").stdout)
        assert second["was_running"] is False
    finally:
        xenlab("down", "--name", name, check=False)


@pytest.mark.full
def test_one_process_uses_libvirt_many_times():
    """libvirt registers its embedded QEMU driver at every open and a process
    has about 20 slots: a long session (a soak, a reset per test) must reuse
    one connection, not run out ("Too many drivers")."""
    from xenlab import Lab

    lab_prerequisites()
    lab = Lab.open("e2e-conn")
    for _ in range(40):
        assert lab.running() is False
