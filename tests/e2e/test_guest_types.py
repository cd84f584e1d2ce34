"""PVH and HVM guests on the real lab (docs/guest-types.md), on the stack that
boots them cheapest: a 1-vCPU trixie lab (Xen 4.20 on the default QEMU,
restored from its snapshot after the first run). Each guest comes up with a
disk and a vif Connected on both ends, runs a command as the type it is, and
its destroy leaves nothing. All of verify's checks on these types run in
ci/test.sh's rotation (the trixie PVH and QEMU 7.2 HVM verifies)."""

from __future__ import annotations

import json

import pytest

from .conftest import lab_prerequisites, xenlab

pytestmark = [pytest.mark.gate, pytest.mark.own_labs]

LAB = "e2e-types"
CONNECTED = "4"


@pytest.fixture(scope="module")
def types_config(tmp_path_factory):
    lab_prerequisites()
    config = tmp_path_factory.mktemp("types") / "trixie.toml"
    config.write_text('[lab]\nvcpus = 1\n[dom0]\nsuite = "trixie"\n')
    xenlab("down", "--lab", LAB, check=False)
    xenlab("--config", str(config), "up", "--lab", LAB)
    try:
        yield str(config)
    finally:
        xenlab("down", "--lab", LAB, check=False)


def dom0(command: str) -> str:
    return xenlab("ssh", "--lab", LAB, "--", command).stdout


@pytest.mark.parametrize("kind", ["pvh", "hvm"])
def test_guest_of_each_type_runs_with_its_devices_connected(types_config, kind):
    name = f"t-{kind}"
    xenlab("guest", "destroy", "--lab", LAB, name, check=False)  # a leftover of an interrupted run
    info = json.loads(xenlab("--config", types_config, "guest", "create", "--lab", LAB, name, "--type", kind,
                             "--kernel", "debian", "--disk", "16M", "--net", "--json", timeout=900).stdout)
    try:
        domid = info["domid"]
        # The guest's own view: Xen says what type it is, and its PV disk is there.
        seen = xenlab("guest", "exec", "--lab", LAB, name, "--", "cat", "/sys/hypervisor/guest_type", "/proc/partitions").stdout
        assert seen.split()[0] == kind.upper(), seen
        assert ("xvde" if kind == "hvm" else "xvda") in seen, seen
        # Both ends of each device Connected, as dom0's XenStore says.
        states = dom0(f"for k in vbd vif; do for d in $(xenstore-list /local/domain/{domid}/device/$k); do "
                      f"p=/local/domain/{domid}/device/$k/$d; xenstore-read $p/state; xenstore-read $(xenstore-read $p/backend)/state; "
                      "done; done")
        assert states.split() == [CONNECTED] * 4, states
    finally:
        xenlab("guest", "destroy", "--lab", LAB, name)
    domains = dom0("xl list")
    backends = dom0("xenstore-list /local/domain/0/backend/vbd 2>/dev/null; xenstore-list /local/domain/0/backend/vif 2>/dev/null; true")
    assert name not in domains and str(domid) not in backends.split(), (domains, backends)
