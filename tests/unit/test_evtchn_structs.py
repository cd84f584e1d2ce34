"""ioctl numbers and struct layouts of the agent (Linux uapi evtchn.h,
gntalloc.h, gntdev.h; Xen event_channel.h, xs_wire.h); no Xen needed."""

import struct

import pytest

from xenlab.agent import cmdline, devchan, errors, evstatus, evtchn, facts, grant, xs
from xenlab.agent.errors import AgentError


def test_evtchn_ioctl_numbers_match_lab_notes():
    assert evtchn.IOCTL_BIND_VIRQ == 0x44500
    assert evtchn.IOCTL_BIND_INTERDOMAIN == 0x84501
    assert evtchn.IOCTL_BIND_UNBOUND_PORT == 0x44502
    assert evtchn.IOCTL_UNBIND == 0x44503
    assert evtchn.IOCTL_NOTIFY == 0x44504
    assert evtchn.IOCTL_RESET == 0x4505
    assert evtchn.IOCTL_RESTRICT_DOMID == 0x24506


def test_grant_ioctl_numbers_and_sizes():
    assert grant.IOCTL_GNTALLOC_ALLOC_GREF == 0x184705
    assert grant.IOCTL_GNTDEV_MAP_GRANT_REF == 0x184700
    assert grant.IOCTL_GNTALLOC_DEALLOC_GREF == 0x104706
    assert grant.IOCTL_GNTALLOC_SET_UNMAP_NOTIFY == 0x104707
    assert grant.IOCTL_GNTDEV_UNMAP_GRANT_REF == 0x104701
    assert grant.IOCTL_GNTDEV_SET_UNMAP_NOTIFY == 0x104707


def test_alloc_gref_packing_has_room_for_every_ref():
    arg = grant.pack_alloc_gref(5, 1)
    assert len(arg) == 24
    assert struct.unpack_from("=HHIQ", arg) == (5, grant.GNTALLOC_FLAG_WRITABLE, 1, 0)
    arg = grant.pack_alloc_gref(0, 33, writable=False)
    assert len(arg) == 16 + 4 * 33
    struct.pack_into("=Q", arg, 8, 0x5000)
    struct.pack_into("=33I", arg, 16, *range(100, 133))
    index, refs = grant.unpack_alloc_gref(arg, 33)
    assert index == 0x5000 and refs == list(range(100, 133))


def test_map_grant_ref_packing():
    arg = grant.pack_map_grant_ref(7, [11, 12, 13])
    assert len(arg) == 16 + 8 * 3
    assert struct.unpack_from("=IIQ", arg) == (3, 0, 0)
    assert struct.unpack_from("=6I", arg, 16) == (7, 11, 7, 12, 7, 13)


def test_evtchn_status_decoding():
    assert evstatus.STATUS_SIZE == 24
    assert evstatus.pack_status(3, 9)[:8] == struct.pack("=H2xI", 3, 9)
    raw = struct.pack("=H2xIII", 0, 5, 2, 1) + struct.pack("=H2xI", 4, 17)
    assert evstatus.decode_status(raw) == {"port": 5, "state": "interdomain", "vcpu": 1, "remote_domid": 4, "remote_port": 17}
    raw = struct.pack("=H2xIII", 0, 6, 1, 0) + struct.pack("=H6x", 4)
    assert evstatus.decode_status(raw)["remote_domid"] == 4
    raw = struct.pack("=H2xIII", 0, 7, 4, 0) + struct.pack("=I4x", 8)
    assert evstatus.decode_status(raw)["virq_name"] == "con_ring"
    raw = struct.pack("=H2xIII", 0, 8, 5, 1) + bytes(8)
    assert evstatus.decode_status(raw) == {"port": 8, "state": "ipi", "vcpu": 1}


def test_devchan_wire_entries_fit_the_ring():
    assert devchan.REQ.size == devchan.RSP.size == devchan.ENTRY == 16
    req = devchan.REQ.pack(1, devchan.OP_ECHO, 0, 3, 4096, 0xDEADBEEF)
    assert devchan.REQ.unpack(req) == (1, devchan.OP_ECHO, 0, 3, 4096, 0xDEADBEEF)
    assert devchan.RSP.unpack(devchan.RSP.pack(1, 1, devchan.ST_EINVAL, 0, 0, 0))[2] == -1
    assert devchan.pattern(5, 10) == devchan.pattern(5, 10) != devchan.pattern(6, 10)
    assert devchan.paths(3, 1) == ("/local/domain/0/backend/xlchan/3/1", "/local/domain/3/device/xlchan/1")


def test_xenstore_header():
    assert xs.HEADER.size == 16
    assert facts.STATE_NAMES[facts.INITIALISED] == "Initialised" and facts.CLOSED == 6


def test_cmdline_parses_signature_options():
    def cmd(remote: int, count: int = 5, rate: float = 1.0, name: str = "x", flag: bool = False):
        return remote, count, rate, name, flag

    assert cmd(**cmdline.parse(cmd, ["--remote", "0x10", "--count=7", "--flag"])) == (16, 7, 1.0, "x", True)
    with pytest.raises(AgentError, match="missing"):
        cmdline.parse(cmd, [])
    with pytest.raises(AgentError, match="unknown option"):
        cmdline.parse(cmd, ["--remote", "1", "--bogus", "2"])
    with pytest.raises(AgentError, match="bad value"):
        cmdline.parse(cmd, ["--remote", "one"])


def test_agent_errors_round_trip_through_the_cli(capsys):
    def boom():
        raise evtchn.EvtchnError("no such port", "bind it first", errno_=22)

    assert cmdline.run_main({"boom": boom}, ["boom"]) == errors.ERROR_EXIT
    line = capsys.readouterr().err.strip()
    assert line.startswith(errors.ERROR_PREFIX)
    from xenlab.deploy import agent_reply
    from xenlab.errors import ChannelError

    with pytest.raises(ChannelError) as caught:
        agent_reply("", "some warning\n" + line, 3, "boom", ChannelError)
    assert caught.value.message == "no such port" and caught.value.hint == "bind it first"


def test_domctl_refusals_use_the_same_convention(capsys, monkeypatch):
    from xenlab.agent import domctl
    from xenlab.deploy import agent_reply
    from xenlab.errors import GuestError

    monkeypatch.setattr(domctl, "domid_of", lambda name: None)
    monkeypatch.setattr(domctl, "read_meta", lambda name: None)
    monkeypatch.setattr(domctl, "console_text", lambda name: "")
    assert domctl.main(["console", "ghost"]) == errors.ERROR_EXIT
    out = capsys.readouterr()
    assert out.out == ""
    with pytest.raises(GuestError, match="no guest named 'ghost'"):
        agent_reply(out.out, out.err, errors.ERROR_EXIT, "domctl console", GuestError)


def test_agent_reply_reads_the_result_and_names_a_silent_death():
    from xenlab.deploy import agent_reply
    from xenlab.errors import ChannelError

    assert agent_reply('[{"name": "a"}]', "", 0, "list", ChannelError) == [{"name": "a"}]
    assert agent_reply('{"port": 5}\nnoise\n{"answered": 3}\n', "", 0, "pong", ChannelError) == {"answered": 3}
    with pytest.raises(ChannelError, match=r"pong failed \(exit 137\): Killed"):
        agent_reply("", "Killed", 137, "pong", ChannelError)
    with pytest.raises(ChannelError, match="printed no JSON"):
        agent_reply("hello", "", 0, "pong", ChannelError)


def test_a_refusal_the_host_acts_on_crosses_as_a_code_with_its_data(capsys, tmp_path, monkeypatch):
    """Two creates that picked one address: the host re-picks on the code, not on the message's words."""
    from xenlab.agent import domctl
    from xenlab.deploy import agent_reply
    from xenlab.errors import GuestError

    monkeypatch.setattr(domctl, "ADDRESSES_DIR", str(tmp_path / "addresses"))
    monkeypatch.setattr(domctl, "guest_dir", lambda name: str(tmp_path / name))
    (tmp_path / "first").mkdir()
    domctl.claim_address("10.99.0.7", "first")
    with pytest.raises(domctl.Refused) as refused:
        domctl.claim_address("10.99.0.7", "second")
    errors.report(refused.value)
    with pytest.raises(GuestError) as caught:
        agent_reply("", capsys.readouterr().err, errors.ERROR_EXIT, "domctl create", GuestError)
    assert caught.value.code == errors.ADDRESS_TAKEN and caught.value.detail == {"address": "10.99.0.7"}


def test_agent_commands_take_their_required_parameters_as_arguments_in_order():
    def leftovers(domid: int, name: str, timeout: float = 30.0, quick: bool = False):
        return None

    assert cmdline.parse(leftovers, ["7", "g", "--timeout", "5", "--quick"]) == {"domid": 7, "name": "g", "timeout": 5.0, "quick": True}
    assert cmdline.parse(leftovers, ["--name", "g", "--domid", "7"]) == {"domid": 7, "name": "g"}
    with pytest.raises(AgentError, match="bad value for DOMID: 'seven'"):
        cmdline.parse(leftovers, ["seven", "g"])
    with pytest.raises(AgentError, match="missing option"):
        cmdline.parse(leftovers, ["7"])
