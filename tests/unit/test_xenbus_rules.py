"""XenBus state rules (seed 003) on timelines recorded from the real lab
(`xenlab trace`, Xen 4.17, Linux 6.1 blkfront/netfront, blkback/netback),
and on hand-made violations of each rule."""

from xenlab.xenstore.recorder import parse_state_path
from xenlab.xenstore.tracer import Change, check, format_reports, format_timeline

B, F = "backend", "frontend"


def timeline(rows, domid=1, released_at=None):
    """rows: (t, side, device, state[, flags]) with flags a string of i (initial), s (maybe_skipped)."""
    out = []
    for row in rows:
        t, side, device, state, flags = (*row, "")[:5]
        kind, devid = device.split("/")
        out.append(Change(t, side, kind, devid, domid, state, f"/{side}/{device}", initial="i" in flags, maybe_skipped="s" in flags))
    if released_at is not None:
        out.append(Change(released_at, "domain", "", "", domid, None))
    return sorted(out, key=lambda c: c.t)


def by_device(reports):
    return {r.device: r for r in reports}


# Recorded: `xenlab trace g1 --create` (one 16M disk, one NIC, busybox root).
CREATE = [
    (5.068, F, "vbd/51712", 1), (5.089, B, "vbd/51712", 1), (5.211, B, "vbd/51712", 2),
    (12.689, F, "vif/0", 1), (12.724, B, "vif/0", 1), (12.850, B, "vif/0", 2),
    (20.831, F, "vbd/51712", 3), (21.399, B, "vbd/51712", 4), (21.592, F, "vif/0", 4),
    (21.977, B, "vif/0", 4), (22.274, F, "vbd/51712", 4),
]
# Recorded: `xenlab trace g1 --destroy` (xl destroy).
DESTROY = [
    (0.135, B, "vbd/51712", 4, "i"), (0.250, B, "vif/0", 4, "i"), (1.281, F, "vbd/51712", 4, "i"), (1.335, F, "vif/0", 4, "i"),
    (7.250, F, "vbd/51712", None), (7.2501, B, "vbd/51712", 5), (7.542, B, "vbd/51712", 6),
    (7.808, F, "vif/0", None), (7.817, B, "vif/0", 5), (7.853, B, "vif/0", 6),
    (11.703, B, "vbd/51712", None), (12.109, B, "vif/0", None),
]
# Recorded: `xl block-detach g2 51728` (backend-first orderly closedown).
BLOCK_DETACH = [
    (0.129, B, "vbd/51728", 4, "i"), (0.231, F, "vbd/51728", 4, "i"),
    (0.759, B, "vbd/51728", 5), (0.788, F, "vbd/51728", 6), (0.868, B, "vbd/51728", 6),
    (1.241, F, "vbd/51728", None), (1.2411, B, "vbd/51728", None),
]
# Recorded: the guest wrote its own vbd frontend state = Closing (frontend-initiated).
FRONTEND_FIRST = [
    (0.297, B, "vbd/51712", 4, "i"), (0.539, F, "vbd/51712", 4, "i"),
    (5.476, F, "vbd/51712", 5), (5.490, B, "vbd/51712", 5), (5.562, F, "vbd/51712", 6), (5.579, B, "vbd/51712", 6),
]

# Recorded in CI (2026-11-26): the same frontend-initiated closedown, but both
# drivers went through Closing before the recorder read either node, so each
# side was read as Connected -> Closed, marked maybe_skipped by the later
# event on the same node.
FRONTEND_FIRST_SKIPPED = [
    (0.30, B, "vbd/51712", 4, "i"), (0.54, F, "vbd/51712", 4, "i"),
    (2.8985, F, "vbd/51712", 6, "s"), (2.9069, B, "vbd/51712", 6, "s"),
]


def test_recorded_create_is_a_clean_bring_up():
    reports = by_device(check(timeline(CREATE)))
    vbd, vif = reports["vbd/51712"], reports["vif/0"]
    assert vbd.ok and vif.ok and not vbd.findings and not vif.findings
    assert vbd.backend == [1, 2, 4] and vbd.frontend == [1, 3, 4]
    assert vif.backend == [1, 2, 4] and vif.frontend == [1, 4]  # netfront skips Initialised
    assert vbd.phases == ["bring-up"] and vif.phases == ["bring-up"]


def test_recorded_xl_destroy_is_a_forced_teardown_not_a_violation():
    reports = by_device(check(timeline(DESTROY, released_at=12.444)))
    for r in reports.values():
        assert r.ok, format_reports([r])
        assert r.phases == ["forced teardown (domain destroyed)"]
        assert any("domain was destroyed" in f.message for f in r.findings)
    assert reports["vbd/51712"].backend == [4, 5, 6, None]


def test_recorded_block_detach_is_an_orderly_backend_first_closedown():
    (r,) = check(timeline(BLOCK_DETACH, domid=2))
    assert r.ok and r.phases == ["orderly closedown (backend first)"]
    assert [f.level for f in r.findings] == ["note"]  # blkfront: Connected -> Closed in answer to Closing
    assert "in answer to the backend's Closing" in r.findings[0].message


def test_recorded_frontend_initiated_closedown():
    (r,) = check(timeline(FRONTEND_FIRST, domid=2))
    assert r.ok and not r.findings and r.phases == ["frontend-initiated closedown"]
    assert r.backend == [4, 5, 6] and r.frontend == [4, 5, 6]


def violations(rows, **kw):
    return [f for r in check(timeline(rows, **kw)) for f in r.findings if f.level == "violation"]


def test_blkfront_skipping_initialised_is_a_violation():
    (v,) = violations([(0, B, "vbd/1", 1), (0.1, F, "vbd/1", 1), (1, B, "vbd/1", 2), (2, F, "vbd/1", 4), (3, B, "vbd/1", 4)])
    assert "frontend Initialising -> Connected is not allowed" in v.message and v.change.t == 2


def test_backend_skipping_initwait_is_a_violation_unless_a_state_may_be_missed():
    rows = [(0, B, "vbd/1", 1), (0.1, F, "vbd/1", 1), (1, F, "vbd/1", 3), (2, B, "vbd/1", 4), (3, F, "vbd/1", 4)]
    (v,) = violations(rows)
    assert "backend Initialising -> Connected" in v.message
    rows[3] = (2, B, "vbd/1", 4, "s")  # a second write read the same value: InitWait may have been overwritten
    assert violations(rows) == []
    assert any("may have been missed" in f.message for r in check(timeline(rows)) for f in r.findings)


def test_backend_connected_before_the_frontend_published_its_ring():
    (v,) = violations([(0, B, "vif/0", 1), (0.1, F, "vif/0", 1), (1, B, "vif/0", 2), (2, B, "vif/0", 4), (3, F, "vif/0", 4)])
    assert "backend Connected while the frontend is Initialising" in v.message


def test_blkfront_connected_before_backend():
    (v,) = violations([(0, B, "vbd/1", 1), (0, F, "vbd/1", 1), (1, B, "vbd/1", 2), (2, F, "vbd/1", 3), (3, F, "vbd/1", 4), (4, B, "vbd/1", 4)])
    assert "frontend Connected before the backend" in v.message


def test_backend_closing_straight_to_closed_order_and_skips():
    connected = [(0, B, "vbd/1", 4, "i"), (0, F, "vbd/1", 4, "i")]
    (v,) = violations(connected + [(1, B, "vbd/1", 6)])
    assert "backend Connected -> Closed is not allowed" in v.message
    # Backend Closed before the frontend closed: the backend must answer the frontend's Closed.
    first = violations(connected + [(1, B, "vbd/1", 5), (2, B, "vbd/1", 6), (3, F, "vbd/1", 6)])[0]
    assert "backend Closed while the frontend is Connected" in first.message and first.change.t == 2


def test_frontend_closing_itself_without_closing_is_a_violation():
    (v,) = violations([(0, B, "vbd/1", 4, "i"), (0, F, "vbd/1", 4, "i"), (1, F, "vbd/1", 6)])
    assert "frontend Connected -> Closed is not allowed" in v.message


def test_directory_removed_before_closed_without_domain_death():
    (v,) = violations([(0, B, "vbd/1", 4, "i"), (0, F, "vbd/1", 4, "i"), (1, F, "vbd/1", None)])
    assert "frontend node removed while Connected" in v.message


def test_new_device_must_start_initialising():
    (v,) = violations([(0, B, "vbd/1", 4)])
    assert "appeared in state Connected" in v.message
    # One state past Initialising can be a value read late (a watch carries
    # no value; blkback writes InitWait right after Initialising): noted.
    report = by_device(check(timeline([(0, B, "vbd/1", 2)])))["vbd/1"]
    assert report.ok and any("appeared in state InitWait" in f.message for f in report.findings if f.level == "note")


def test_removal_right_after_a_write_not_read_in_time():
    closing = [(0, B, "xlchan/7", 4, "i"), (0, F, "xlchan/7", 4, "i"), (1, F, "xlchan/7", 5), (2, B, "xlchan/7", 5), (3, F, "xlchan/7", 6)]
    # The backend's own event (its Closed write) read the node already removed: noted.
    report = by_device(check(timeline(closing + [(4, B, "xlchan/7", None, "s")])))["xlchan/7"]
    assert report.ok and any("most likely Closed" in f.message for f in report.findings)
    # Removed while Closing with no such write: a violation.
    (v,) = violations(closing + [(4, B, "xlchan/7", None)])
    assert "backend node removed while Closing" in v.message
    # One write cannot take Connected to Closed: still a violation.
    (v,) = violations([(0, B, "vbd/1", 4, "i"), (0, F, "vbd/1", 4, "i"), (1, B, "vbd/1", None, "s")])
    assert "backend node removed while Connected" in v.message


def test_timeline_lines_name_states_and_transitions():
    lines = format_timeline(timeline(BLOCK_DETACH, domid=2))
    assert "(at start) Connected" in lines[0]
    assert any("backend   Connected -> Closing" in line for line in lines)
    assert lines[-1].endswith("Closed -> (removed)")


def test_state_paths_are_parsed_for_both_sides():
    assert parse_state_path("/local/domain/0/backend/vbd/3/51712/state") == ("backend", "vbd", "51712", 3)
    assert parse_state_path("/local/domain/0/backend/qdisk/3/51712/state") == ("backend", "vbd", "51712", 3)
    assert parse_state_path("/local/domain/3/device/vif/0/state") == ("frontend", "vif", "0", 3)
    assert parse_state_path("/local/domain/0/backend/console/3/0/state") is None
    assert parse_state_path("/local/domain/3/device/vif/0/state-x") is None


def test_states_read_late_are_noted_not_reported_as_violations():
    (r,) = check(timeline(FRONTEND_FIRST_SKIPPED))
    assert r.ok and r.phases == ["frontend-initiated closedown"], format_reports([r])  # the frontend's event came first
    assert r.frontend == [4, 6] and r.backend == [4, 6]
    notes = [f.message for f in r.findings]
    assert any("frontend Closed while the backend is Connected" in n and "not judged" in n for n in notes), notes
    # the same values read on time (no later event on the node) are violations
    on_time = [(*row[:4], row[4].replace("s", "")) for row in FRONTEND_FIRST_SKIPPED]
    (strict,) = check(timeline(on_time))
    violations = [f.message for f in strict.findings if f.level == "violation"]
    assert violations == ["frontend Connected -> Closed is not allowed (after Connected comes Closing, Reconfiguring)",
                          "backend Connected -> Closed is not allowed (after Connected comes Closing, Reconfiguring)"], violations
