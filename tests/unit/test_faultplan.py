"""Fault plan grammar: every fault, defaults, errors that say what is wrong, the file form."""

import pytest

from xenlab.agent.blkif import BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_READ, BLKIF_OP_WRITE
from xenlab.agent.facts import CLOSED, INITWAIT
from xenlab.agent.faultplan import (
    FAULTS,
    STATE_JUMP_TARGETS,
    Fault,
    FaultPlanError,
    SectorRange,
    describe_faults,
    format_plan,
    load_plan,
    parse_plan,
)

EVERY_FAULT = {
    "io-error:sectors=0-7;op=write": {"sectors": SectorRange(0, 7), "op": "write"},
    "slow:ms=50": {"ms": 50},
    "lost-notify:every=3": {"every": 3},
    "extra-notify:every=1": {"every": 1},
    "unknown-id:every=5": {"every": 5},
    "duplicate-response:every=7": {"every": 7},
    "rsp-prod-past-req-prod:after=0": {"after": 0},
    "bad-ring-page-order:value=-1": {"value": -1},
    "bad-max-indirect-segments:value=100000": {"value": 100000},
    "unmappable-grant:every=2": {"every": 2},
    "state-jump:to=initwait;after=4": {"to": "initwait", "after": 4},
}


def test_the_table_covers_every_fault():
    assert set(FAULTS) == {item.split(":")[0] for item in EVERY_FAULT}
    assert all(kind.what and kind.must for kind in FAULTS.values())
    assert len(describe_faults()) == len(FAULTS)


@pytest.mark.parametrize("item", EVERY_FAULT)
def test_every_fault_parses(item):
    (fault,) = parse_plan(item)
    assert fault == Fault(item.split(":")[0], EVERY_FAULT[item])
    assert parse_plan(str(fault)) == [fault]


def test_defaults():
    plan = parse_plan(",".join(FAULTS))
    got = {f.name: f.params for f in plan}
    assert got["io-error"] == {"sectors": None, "op": "any"}
    assert got["slow"] == {"ms": 50}
    assert got["lost-notify"] == got["extra-notify"] == got["unknown-id"] == {"every": 10}
    assert got["duplicate-response"] == got["unmappable-grant"] == {"every": 10}
    assert got["rsp-prod-past-req-prod"] == {"after": 10}
    assert got["bad-ring-page-order"] == {"value": 32}
    assert got["bad-max-indirect-segments"] == {"value": 0xFFFFFFFF}
    assert got["state-jump"] == {"to": "closed", "after": 10}
    assert parse_plan("state-jump:after=2") == [Fault("state-jump", {"to": "closed", "after": 2})]


def test_several_faults_blanks_and_round_trip():
    plan = parse_plan(" io-error : sectors = 8 ; op = read , slow:ms=0,io-error:sectors=100-199")
    assert [f.name for f in plan] == ["io-error", "slow", "io-error"]
    assert plan[0]["sectors"] == SectorRange(8, 8) and plan[1]["ms"] == 0
    assert format_plan(plan) == "io-error:sectors=8;op=read,slow:ms=0,io-error:sectors=100-199;op=any"
    assert parse_plan(format_plan(plan)) == plan


@pytest.mark.parametrize("text,words", [
    ("io-eror", ["unknown fault 'io-eror'", "known: io-error, slow"]),
    ("slow:msec=5", ["slow", "unknown key 'msec'", "allowed: ms"]),
    ("io-error:op=rw", ["io-error", "bad value op='rw'", "read|write|any"]),
    ("io-error:sectors=7-0", ["bad range sectors='7-0'", "FIRST-LAST"]),
    ("io-error:sectors=a-b", ["bad range sectors='a-b'"]),
    ("io-error:sectors=-3", ["bad range"]),
    ("slow:ms=fast", ["bad value ms='fast'", "a whole number >= 0"]),
    ("slow:ms=-1", ["bad value ms='-1'"]),
    ("lost-notify:every=0", ["bad value every='0'", ">= 1"]),
    ("bad-ring-page-order:value=1.5", ["bad value value='1.5'", "a whole number"]),
    ("state-jump:to=connected", ["bad value to='connected'", "closed|initwait"]),
    ("slow:ms", ["'ms'", "not KEY=VALUE"]),
    ("slow:=5", ["not KEY=VALUE"]),
    ("slow:ms=1;ms=2", ["ms given twice"]),
    ("slow,slow:ms=3", ["slow given twice", "only io-error may repeat"]),
    ("slow,,lost-notify", ["empty item"]),
    ("slow,", ["empty item"]),
    ("  ", ["empty fault plan"]),
])
def test_errors_name_what_is_wrong(text, words):
    with pytest.raises(FaultPlanError) as e:
        parse_plan(text)
    assert isinstance(e.value, ValueError)
    for word in words:
        assert word in str(e.value)


def test_error_names_the_item():
    with pytest.raises(FaultPlanError) as e:
        parse_plan("slow:ms=5,io-error:op=rw")
    assert e.value.item == "io-error:op=rw" and "'io-error:op=rw'" in str(e.value)


def test_file_form_with_comments(tmp_path):
    path = tmp_path / "faults.plan"
    path.write_text("# a flaky disk\n\nio-error:sectors=0-7;op=write   # the first page\n  slow:ms=20, lost-notify\n#state-jump\n")
    plan = load_plan(path)
    assert [f.name for f in plan] == ["io-error", "slow", "lost-notify"]
    assert load_plan(str(path)) == plan  # a string with a '/' is a path
    assert load_plan("slow:ms=20") == [Fault("slow", {"ms": 20})]


def test_file_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.plan"
    path.write_text("slow\n# fine so far\nio-error:op=sideways\n")
    with pytest.raises(FaultPlanError) as e:
        load_plan(path)
    assert str(e.value).startswith(f"{path}:3: io-error: bad value op='sideways'")
    assert e.value.line == 3
    path.write_text("slow\nslow\n")
    with pytest.raises(FaultPlanError, match=":2: slow given twice"):
        load_plan(path)
    with pytest.raises(FaultPlanError, match="cannot read fault plan"):
        load_plan(tmp_path / "missing.plan")


def test_a_bare_file_name_is_plan_text_with_a_hint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "myplan").write_text("slow\n")
    with pytest.raises(FaultPlanError, match=r"write \./myplan"):
        load_plan("myplan")
    assert load_plan("./myplan") == [Fault("slow", {"ms": 50})]


def test_io_error_matches_sector_range_and_op():
    (fault,) = parse_plan("io-error:sectors=8-15;op=write")
    assert fault.matches(BLKIF_OP_WRITE, 8, 1)
    assert fault.matches(BLKIF_OP_WRITE, 0, 9)       # 0..8 reaches sector 8
    assert fault.matches(BLKIF_OP_WRITE, 15, 100)
    assert not fault.matches(BLKIF_OP_WRITE, 0, 8)   # 0..7
    assert not fault.matches(BLKIF_OP_WRITE, 16, 8)
    assert not fault.matches(BLKIF_OP_READ, 8, 8)
    assert not fault.matches(BLKIF_OP_WRITE, 8, 0)   # no sectors touched
    (anything,) = parse_plan("io-error")
    assert anything.matches(BLKIF_OP_READ, 123456, 1) and anything.matches(BLKIF_OP_DISCARD, 0, 8)
    assert not anything.matches(BLKIF_OP_FLUSH_DISKCACHE, 0, 0)
    with pytest.raises(ValueError):
        parse_plan("slow")[0].matches(BLKIF_OP_READ, 0, 1)


def test_counters():
    every3, after2, slow = parse_plan("unknown-id:every=3,state-jump:after=2,slow")
    assert [n for n in range(10) if every3.fires(n)] == [3, 6, 9]
    assert [n for n in range(10) if after2.fires(n)] == [2]
    assert all(slow.fires(n) for n in range(3))
    assert STATE_JUMP_TARGETS == {"closed": CLOSED, "initwait": INITWAIT}
