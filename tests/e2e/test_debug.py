"""`xenlab debug ...` on the real lab: gdb through QEMU's gdbstub reading a
register and symbols, a paused guest's stack named from its System.map,
Xen's 'e' debug key listing a guest's channels, and a guest made to panic
whose core is taken on destroy and read back."""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import pytest

from xenlab.agent.facts import CORES_DIR
from xenlab.guest import coredump
from xenlab.guest.manager import Guests
from xenlab.guest.spec import GuestSpec

from .conftest import LAB, fresh_guest, xenlab

GUEST = "dbg-peer"


@pytest.fixture(scope="module")
def peer(lab):
    with fresh_guest(lab, GuestSpec(name=GUEST, net=True)) as info:
        yield info


@pytest.mark.gate
def test_gdb_reads_a_register_and_symbols_and_leaves_the_lab_running(lab_info, dom0):
    out = xenlab("debug", "gdb", "--lab", LAB, "--", "-batch", "-ex", "info registers rip", "-ex", "info symbol $pc",
                 "-ex", "info address do_domctl", "-ex", "info address do_idle", timeout=600)
    text = out.stdout
    assert re.search(r"^rip\s+0x[0-9a-f]{16}", text, re.M), text
    assert re.search(r" in section \.text", text), f"the stopped pc is not named:\n{text}\n{out.stderr}"
    assert re.search(r'Symbol "do_domctl" is at 0xffff82d0[0-9a-f]+', text), f"no Xen symbol:\n{text}\n{out.stderr}"
    assert re.search(r'Symbol "do_idle" is at 0xffffffff8[0-9a-f]+', text), f"no dom0 kernel symbol:\n{text}\n{out.stderr}"
    # Quitting gdb detached: the VM runs on and answers.
    assert dom0("xl list").stdout.startswith("Name")
    # A second session reuses the stub.
    again = xenlab("debug", "gdb", "--lab", LAB, "--", "-batch", "-ex", "info registers rip", timeout=600)
    assert re.search(r"^rip\s+0x", again.stdout, re.M), again.stdout + again.stderr


@pytest.mark.gate
def test_gdb_missing_on_the_host_is_a_clear_error(lab_info):
    proc = xenlab("debug", "gdb", "--lab", LAB, "--", "-batch", check=False, env={**os.environ, "PATH": "/nonexistent"})
    assert proc.returncode != 0 and "gdb is not installed" in proc.stdout + proc.stderr


@pytest.mark.full
def test_stack_of_a_paused_guest_names_kernel_functions(lab, peer, dom0):
    dom0(f"xl pause {GUEST}")
    try:
        data = json.loads(xenlab("debug", "stack", GUEST, "--lab", LAB, "--json").stdout)
    finally:
        dom0(f"xl unpause {GUEST}")
    assert data["symbol_map"], data
    names = set(dom0(f"awk '{{print $3}}' {data['symbol_map']}").stdout.split())
    vcpu0 = data["vcpus"][0]
    assert vcpu0["rip_symbol"].split("+")[0] in names, data["text"]
    frames = [f["symbol"].split("+")[0] for f in vcpu0["frames"] if f["symbol"]]
    assert frames and set(frames) <= names, data["text"]
    one = json.loads(xenlab("debug", "stack", GUEST, "--lab", LAB, "--vcpu", "0", "--json").stdout)
    assert [v["vcpu"] for v in one["vcpus"]] == [0]
    bad = xenlab("debug", "stack", GUEST, "--lab", LAB, "--vcpu", "9", check=False)
    assert bad.returncode != 0 and "no vCPU 9" in bad.stdout + bad.stderr
    gone = xenlab("debug", "stack", "no-such-guest", "--lab", LAB, check=False)
    assert gone.returncode != 0 and "no running guest named 'no-such-guest'" in gone.stdout + gone.stderr


@pytest.mark.full
def test_key_e_lists_the_guests_event_channels(lab, peer):
    outputs = json.loads(xenlab("debug", "keys", "e", "--lab", LAB, "--json").stdout)
    assert len(outputs) == 1 and outputs[0]["key"] == "e" and outputs[0]["complete"]
    ports = outputs[0]["domains"][str(peer["domid"])]
    # blkfront and netfront bind to dom0's backends: interdomain channels whose remote is dom 0.
    assert sum(1 for p in ports if p.get("state") == "interdomain" and p.get("d") == 0) >= 2, ports
    text = xenlab("debug", "keys", "e", "--lab", LAB).stdout
    assert f"Event channel information for domain {peer['domid']}" in text or f"d{peer['domid']}" in text


@pytest.mark.gate
def test_an_unknown_debug_key_is_refused_with_the_list(lab_info):
    known = json.loads(xenlab("debug", "keys", "h", "--lab", LAB, "--json").stdout)[0]["lines"]
    listed = set(re.findall(r"key '(.)'", "\n".join(known)))
    unused = next(c for c in "jJkKlLyYzZ" if c not in listed)
    proc = xenlab("debug", "keys", unused, "--lab", LAB, check=False)
    assert proc.returncode != 0 and f"no debug key '{unused}'" in proc.stdout + proc.stderr


@pytest.mark.gate
def test_a_panicked_guest_leaves_a_core_that_shows_the_panic(lab, dom0, request):
    name = "dbg-crash"
    with Guests(lab) as guests:
        if any(g.get("name") == name for g in guests.list()):
            guests.destroy(name)
        guests.create(GuestSpec(name=name))
    try:
        dom0(f"xl sysrq {name} c")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            rows = json.loads(xenlab("guest", "list", "--lab", LAB, "--json").stdout)
            if any(r["name"] == name and r["state"] == "crashed" for r in rows):
                break
            time.sleep(2)
        else:
            pytest.fail(f"guest {name} did not crash after sysrq c: {rows}")
        destroyed = json.loads(xenlab("guest", "destroy", name, "--lab", LAB, "--json").stdout)
    finally:
        with Guests(lab) as guests:
            if any(g.get("name") == name for g in guests.list()):
                guests.destroy(name)
    folder = destroyed["core_dir"]
    request.addfinalizer(lambda: shutil.rmtree(folder, ignore_errors=True))  # 128 MiB a run
    assert os.path.getsize(os.path.join(folder, coredump.CORE_FILE)) >= 64 << 20
    assert os.path.exists(os.path.join(folder, coredump.MAP_FILE)) and os.path.exists(os.path.join(folder, coredump.KERNEL_FILE))
    assert dom0(f"ls {destroyed['core']['core']}", check=False).returncode != 0  # not left in dom0
    report = xenlab("debug", "core-log", folder, "--panic").stdout
    assert "Kernel panic - not syncing" in report and "sysrq" in report.lower(), report
    assert re.search(r"sysrq_handle_crash\+0x", report), report  # a frame of the backtrace, by name


@pytest.mark.full
def test_a_crashed_guest_whose_core_was_taken_is_destroyed_without_another(lab, dom0, request):
    """A failed test's artifacts take a crashed guest's core; the fixture's
    destroy afterwards does not take it again (each costs the guest's memory in
    dom0 and seconds under TCG)."""
    name = "dbg-crash2"
    with Guests(lab) as guests:
        if any(g.get("name") == name for g in guests.list()):
            guests.destroy(name)
        guests.create(GuestSpec(name=name, memory=64))
        try:
            dom0(f"xl sysrq {name} c")
            deadline = time.monotonic() + 120
            while not any(r["name"] == name and r["state"] == "crashed" for r in guests.list()):
                assert time.monotonic() < deadline, f"guest {name} did not crash after sysrq c"
                time.sleep(2)
            taken = guests.dump_core(name)
            request.addfinalizer(lambda: shutil.rmtree(taken["core_dir"], ignore_errors=True))
            assert taken["crashed"] and os.path.getsize(os.path.join(taken["core_dir"], coredump.CORE_FILE)) >= 32 << 20
            destroyed = guests.destroy(name)
        finally:
            if any(g.get("name") == name for g in guests.list()):
                guests.destroy(name)
    assert destroyed.get("core_taken_before") and "core" not in destroyed and "core_dir" not in destroyed, destroyed
    assert dom0(f"ls {CORES_DIR}/{name}-*", check=False).returncode != 0  # nothing of it left in dom0


@pytest.mark.full
def test_xentrace_records_the_event_channel_work_of_a_ping(lab, peer):
    data = json.loads(xenlab("debug", "xentrace", "--lab", LAB, "--events", "evtchn", "--max-lines", "50", "--json", "--",
                             f"busybox ping -c 3 -W 5 {peer['ip']}").stdout)
    assert data["rc"] == 0 and "3 packets received" in data["output"], data["output"]
    assert data["mask"] == "0x0022f000" and data["trace_bytes"] > 0 and data["decoded_total"] > len(data["decoded"]) > 0
    # netback tells netfront of each packet through an event channel: EVTCHNOP_send is a hypercall.
    assert data["counts"].get("hypercall:evtchn_op", 0) >= 3, data["counts"]  # xenalyze names it so
    bad = xenlab("debug", "xentrace", "--lab", LAB, "--events", "irq", "--", "true", check=False)
    assert bad.returncode != 0 and "unknown trace event class 'irq'" in bad.stdout + bad.stderr
    failing = xenlab("debug", "xentrace", "--lab", LAB, "--", "exit 3", check=False)
    assert failing.returncode == 3  # the command's own exit code


@pytest.mark.full
def test_core_of_a_running_guest_holds_its_boot_log(lab, peer, request):
    data = json.loads(xenlab("debug", "core", GUEST, "--lab", LAB, "--json").stdout)
    request.addfinalizer(lambda: shutil.rmtree(data["core_dir"], ignore_errors=True))
    assert data["domid"] == peer["domid"] and not data["crashed"] and data["bytes"] >= 64 << 20
    log = json.loads(xenlab("debug", "core-log", data["core_dir"], "--json").stdout)["lines"]
    assert any("Linux version" in line for line in log) and any(f"xenlab.name={GUEST}" in line for line in log), log[:5]
    # The guest runs on after its core was taken.
    assert xenlab("guest", "exec", "--lab", LAB, GUEST, "--", "echo", "alive").stdout.strip() == "alive"


@pytest.mark.full
def test_stack_of_a_debian_kernel_guest_is_named_too(lab, dom0):
    # Debian's /boot/System.map is a stub: the map comes from dom0's kallsyms (the same kernel).
    with fresh_guest(lab, GuestSpec(name="dbg-debian", kernel="debian")):
        data = json.loads(xenlab("debug", "stack", "dbg-debian", "--lab", LAB, "--json").stdout)
    frames = [f["symbol"].split("+")[0] for f in data["vcpus"][0]["frames"] if f["symbol"]]
    assert frames and "The real System.map" not in data["text"], data["text"]
    assert set(frames) <= set(dom0("awk '{print $3}' /proc/kallsyms").stdout.split())
