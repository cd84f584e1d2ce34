"""`xenlab verify` on the shared e2e lab: every check SUCCESS, JUnit and JSON
written and consistent, the guest gone afterwards; and a guest that panics
while booting is reported as CRASH with its console tail (exit 3), cleaned up."""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET

import pytest

from xenlab.agent.facts import GUESTS_DIR

from .conftest import LAB, xenlab

pytestmark = pytest.mark.own_labs  # its lab's state is verify's own: under xdist, beside the session lab's tests

EXPECTED = {
    "lab.boot", "lab.dom0", "guest.create", "xenbus.trace-create", "xenstore.layout", "xenstore.perms",
    "evtchn.catalogue", "evtchn.ping", "devchan.echo", "guest.destroy", "xenbus.trace-destroy", "lab.crash-scan",
    # Xen's own tool tests; test-tsx builds an HVM guest and test-resource a PVH one (the default CPU model offers SVM)
    "xen.tools.test-cpu-policy", "xen.tools.test-paging-mempool", "xen.tools.test-resource", "xen.tools.test-tsx",
    "xen.tools.test-xenstore",
}


@pytest.fixture(scope="module")
def verified(lab_info, tmp_path_factory):
    out = tmp_path_factory.mktemp("verify")
    junit, report = out / "verify.xml", out / "verify.json"
    t0 = time.monotonic()
    proc = xenlab("verify", "--name", LAB, "--guest", "e2e-verify", "--junit", str(junit), "--json", str(report), check=False, timeout=1800)
    return {"proc": proc, "junit": junit, "json": report, "seconds": time.monotonic() - t0}


@pytest.mark.gate
def test_verify_passes_and_its_junit_says_so(verified):
    proc = verified["proc"]
    assert proc.returncode == 0, f"verify exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    suite = ET.parse(verified["junit"]).getroot().find("testsuite")
    cases = list(suite.iter("testcase"))
    names = {f"{c.get('classname').removeprefix('xenlab.verify.')}.{c.get('name')}" for c in cases}
    assert EXPECTED <= names, EXPECTED - names
    ring = sorted(n for n in names if n.startswith("ring."))
    assert any("block xvda" in n for n in ring) and any("read-only" in n for n in ring) and any(n.startswith("ring.net") for n in ring), ring
    assert suite.get("tests") == str(len(cases)) and suite.get("failures") == "0" and suite.get("errors") == "0" and suite.get("skipped") == "0"
    for c in cases:
        assert not list(c.iter("failure")) and not list(c.iter("error")) and not list(c.iter("skipped")), ET.tostring(c).decode()
        assert c.find("system-out").text.startswith("SUCCESS: ") and float(c.get("time")) >= 0


@pytest.mark.gate
def test_verify_json_and_table_match_the_junit(verified):
    report = json.loads(verified["json"].read_text())
    assert report["ok"] and report["exit_code"] == 0 and report["lab"] == LAB
    assert report["summary"]["SUCCESS"] == len(report["checks"]) >= len(EXPECTED) + 3
    by_name = {c["name"]: c for c in report["checks"]}
    assert "Xen 4.17" in by_name["lab.boot"]["evidence"]
    assert "no violation" in by_name["xenbus.trace-create"]["evidence"]
    assert "EACCES" in by_name["xenstore.perms"]["evidence"]
    assert "echo requests" in by_name["devchan.echo"]["evidence"]
    assert "skipped inside" not in by_name["xen.tools.test-resource"]["evidence"]  # its PVH domain was built
    # The figures are data, not only words: as the evidence line says them.
    data = {name: check["data"] for name, check in by_name.items()}
    assert data["lab.boot"]["xen_version"].startswith("4.17.") and data["lab.boot"]["boot_seconds"] > 0
    create = data["guest.create"]
    assert 0 < create["xl_create_seconds"] <= create["connected_seconds"] and create["ready_seconds"] > 0 and create["devices"] == 3
    assert f"Connected {create['connected_seconds']:.1f} s" in by_name["guest.create"]["evidence"]
    assert 0 < data["evtchn.ping"]["p50_us"] <= data["evtchn.ping"]["p99_us"]
    assert f"p99 {data['evtchn.ping']['p99_us']:.0f} us" in by_name["evtchn.ping"]["evidence"]
    assert data["devchan.echo"]["requests"] > 0 and data["devchan.echo"]["mb_per_s"] > 0
    assert data["guest.destroy"]["destroy_seconds"] > 0 and data["xenstore.layout"]["devices"] == 3
    table = verified["proc"].stdout.splitlines()
    assert table[0].split() == ["check", "result", "time", "evidence"]
    for check in report["checks"]:
        assert any(line.startswith(check["name"][:40]) and " SUCCESS " in line for line in table), check["name"]
    assert report["seconds"] <= verified["seconds"]


@pytest.mark.gate
def test_verify_leaves_no_guest(verified, dom0):
    assert "e2e-verify" not in dom0("xl list").stdout
    assert "e2e-verify" not in dom0(f"ls {GUESTS_DIR}/").stdout


@pytest.mark.full
def test_a_guest_that_panics_is_a_crash(lab_info, dom0, tmp_path):
    """rdinit pointing nowhere: the guest kernel panics at boot. verify says CRASH
    with the console tail, skips what needs the guest, exits 3 and leaves no guest."""
    junit = tmp_path / "crash.xml"
    proc = xenlab("verify", "--name", LAB, "--guest", "e2e-crash", "--guest-extra", "rdinit=/none-such", "--junit", str(junit),
                  "--skip", "lab.crash-scan", check=False, timeout=900)
    assert proc.returncode == 3, f"{proc.stdout}\n{proc.stderr}"
    assert "verify:" in proc.stdout + proc.stderr and "guest.create (CRASH" in proc.stdout + proc.stderr
    cases = {f"{c.get('classname').removeprefix('xenlab.verify.')}.{c.get('name')}": c for c in ET.parse(junit).getroot().iter("testcase")}
    crash = cases["guest.create"].find("error")
    assert crash is not None and crash.get("type") == "CRASH"
    assert "Kernel panic" in crash.text and "console" in crash.text
    assert cases["xenstore.layout"].find("skipped").get("message").startswith("not tried: the guest crashed (Kernel panic")
    assert cases["lab.crash-scan"].find("skipped").get("message").startswith("allowed:")
    assert "e2e-crash" not in dom0("xl list").stdout
