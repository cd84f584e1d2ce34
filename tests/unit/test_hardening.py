"""The one-line outcome of a fault plan's probe, from what was observed
(xenlab.guest.hardening.outcome): classification logic only, no lab."""

import pytest

from xenlab.agent.faultplan import FAULTS, parse_plan
from xenlab.guest.hardening import STANDARD_PLANS, outcome


def observed(finished=True, write_ok=True, read_ok=True, same=True, out="", log=(), ended="detached", alive=True, trouble=()):
    return {"io": {"finished": finished, "write_ok": write_ok, "read_ok": read_ok, "same": same, "out": out, "kernel_log": list(log)},
            "backend": {"ended": ended}, "guest_alive": alive, "guest_trouble": list(trouble)}


def test_standard_plans_parse_and_cover_every_fault():
    names = {parse_plan(p)[0].name for p in STANDARD_PLANS}
    assert names == set(FAULTS)


@pytest.mark.parametrize("result,expected", [
    (observed(), "works, data intact"),
    (observed(read_ok=False, same=False, out="rrc=1 dd: /dev/xvdb: Input/output error"), "just the hit I/Os fail with EIO, the disk stays usable"),
    (observed(read_ok=False, same=False, log=["I/O error, dev xvdb, sector 0 op 0x0:(READ)"]), "just the hit I/Os fail with EIO, the disk stays usable"),
    (observed(finished=False, write_ok=False, read_ok=False, same=False,
              log=["xvdb: response has incorrect id (37)", "xvdb disabled for further use"]),
     "device disabled (xvdb: response has incorrect id (37)); I/O in flight stays pending"),
    (observed(finished=False, write_ok=False, read_ok=False, same=False, ended="frontend-closed"), "device closed; I/O hangs"),
    (observed(write_ok=False, read_ok=False, same=False, ended="frontend-closed"), "device closed; I/O failed, no hang"),
    (observed(alive=False), "guest crashed or hung: "),
    (observed(trouble=["Kernel panic - not syncing: Fatal exception"]), "guest crashed or hung: Kernel panic - not syncing: Fatal exception"),
    (observed(same=False), "data differs"),
])
def test_outcome(result, expected):
    assert outcome(result) == expected
