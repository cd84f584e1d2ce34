"""The XenBus timeline page (xenlab.xenstore.timeline_html) on hand-made
timelines: a lane per side, state segments, findings, the flag of a
handshake stuck half-way, escaping; the page as Chromium draws it; and the
pages `xenlab trace --html`, verify and the pytest plugin write."""

from __future__ import annotations

import time
from dataclasses import replace

from click.testing import CliRunner

from tests.browser import parse_dom, png_colours, render_in_chromium
from tests.unit.test_xenbus_rules import CREATE, DESTROY, B, F, timeline
from xenlab.agent.facts import STATE_NAMES
from xenlab.cli import main
from xenlab.xenstore.timeline_html import LABEL_WIDTH, PLOT_WIDTH, STATE_COLOURS, render_html, state_colour
from xenlab.xenstore.tracer import CONNECTED, INITWAIT, Change, check


def real_paths(changes, backend_domid=0):
    """The state node paths the recorder would have seen."""
    def path(c):
        if c.side == "frontend":
            return f"/local/domain/{c.domid}/device/{c.kind}/{c.devid}/state"
        if c.side == "backend":
            return f"/local/domain/{backend_domid}/backend/{c.kind}/{c.domid}/{c.devid}/state"
        return c.path
    return [replace(c, path=path(c)) for c in changes]


# The backend waits in InitWait to the end; its frontend never leaves Initialising.
STUCK = [(0.10, F, "vbd/51712", 1), (0.20, B, "vbd/51712", 1), (0.40, B, "vbd/51712", 2),
         (0.50, F, "vif/0", 1), (0.60, B, "vif/0", 1), (0.70, B, "vif/0", 2), (0.90, F, "vif/0", 4), (1.00, B, "vif/0", 4)]


def page(rows, title="trace", **kw):
    changes = real_paths(timeline(rows, **kw))
    html = render_html(changes, check(changes), title)
    return html, parse_dom(html)


def lanes(root) -> dict:
    return {g.attrs["data-lane"]: g for g in root.find_all("g", "lane")}


def states(lane) -> list[str]:
    return [s.attrs["data-state"] for s in lane.find_all("g", "seg")]


def test_a_lane_for_every_side_of_every_device():
    _, root = page(CREATE)
    found = lanes(root)
    assert set(found) == {"vbd/51712 frontend", "vbd/51712 backend", "vif/0 frontend", "vif/0 backend"}
    labels = {g.find_all("text", "lane-label")[0].text for g in found.values()}
    assert labels == {"vbd/51712 frontend (d1)", "vbd/51712 backend (d0)", "vif/0 frontend (d1)", "vif/0 backend (d0)"}
    devices = {s.attrs["data-device"]: s for s in root.find_all("section", "device")}
    assert set(devices) == {"vbd/51712", "vif/0"} and all(s.attrs["data-verdict"] == "ok" for s in devices.values())
    assert "bring-up" in devices["vbd/51712"].all_text()


def test_each_state_is_a_coloured_segment_in_time_order():
    _, root = page(CREATE)
    found = lanes(root)
    assert states(found["vbd/51712 backend"]) == ["Initialising", "InitWait", "Connected"]
    assert states(found["vbd/51712 frontend"]) == ["Initialising", "Initialised", "Connected"]
    assert states(found["vif/0 frontend"]) == ["Initialising", "Connected"]
    segs = found["vbd/51712 backend"].find_all("g", "seg")
    rects = [s.find_all("rect")[0] for s in segs]
    xs = [float(r.attrs["x"]) for r in rects]
    assert xs == sorted(xs) and all(float(r.attrs["width"]) > 0 for r in rects)
    # Each segment ends where the next begins; the last one runs to the end of the picture.
    for a, b in zip(rects, rects[1:]):
        assert abs(float(a.attrs["x"]) + float(a.attrs["width"]) - float(b.attrs["x"])) < 0.2
    assert segs[-1].attrs["data-to"] == "end" and "open" in segs[-1].classes
    assert abs(float(rects[-1].attrs["x"]) + float(rects[-1].attrs["width"]) - (LABEL_WIDTH + PLOT_WIDTH)) < 0.2
    assert rects[-1].attrs["fill"] == state_colour(CONNECTED) and rects[1].attrs["fill"] == state_colour(INITWAIT)
    # Wide enough segments are labelled with their state's name.
    assert [t.text for t in segs[1].find_all("text", "seg-label")] == ["InitWait"]


def test_legend_names_every_state_in_a_colour_of_its_own():
    _, root = page(CREATE)
    keys = [k.attrs["data-state"] for k in root.find_all("span", "key")]
    assert keys[:len(STATE_NAMES)] == list(STATE_NAMES)
    assert len(STATE_COLOURS) == len(STATE_NAMES) == len(set(STATE_COLOURS))


def test_a_violation_is_marked_in_red_with_its_message():
    # The backend connects before the frontend published its ring.
    rows = [(0.1, B, "vbd/51712", 1), (0.2, F, "vbd/51712", 1), (0.3, B, "vbd/51712", 2), (0.4, B, "vbd/51712", 4)]
    html, root = page(rows)
    (section,) = root.find_all("section", "device")
    assert section.attrs["data-verdict"] == "violation"
    assert section.find_all("span", "verdict")[0].text == "violation"
    (marker,) = lanes(root)["vbd/51712 backend"].parent.find_all("g", "finding", level="violation")
    message = check(timeline(rows))[0].findings[0].message
    assert marker.attrs["data-message"] == message and "must publish its ring first" in message
    assert marker.find_all("line") and marker.find_all("circle")
    (item,) = section.find_all("li", "finding", level="violation")
    assert message in item.text and "backend, +0.400 s" in item.text
    assert "svg .finding.violation line { stroke: #d00" in html


def test_notes_are_marked_quietly_and_domain_release_drawn():
    _, root = page(DESTROY, released_at=12.444)
    sections = root.find_all("section", "device")
    assert all(s.attrs["data-verdict"] == "ok" for s in sections)
    notes = root.find_all("g", "finding", level="note")
    assert notes and not root.find_all("g", "finding", level="violation")
    assert all(n.find_all("path") and not n.find_all("circle") for n in notes)
    assert len(root.find_all("line", "release")) == 2  # one per device of the released domain
    assert root.find_all("path", "removed")


def test_a_stuck_handshake_is_flagged():
    _, root = page(STUCK)
    found = lanes(root)
    backend, frontend = found["vbd/51712 backend"], found["vbd/51712 frontend"]
    for lane in (backend, frontend):
        assert "stuck" in lane.classes and lane.attrs["data-connected"] == "false"
    assert backend.find_all("text", "flag")[0].text == "never Connected (stuck in InitWait)"
    assert frontend.find_all("text", "flag")[0].text == "never Connected (stuck in Initialising)"
    last = backend.find_all("g", "seg")[-1]
    assert last.attrs["data-state"] == "InitWait" and last.attrs["data-to"] == "end"
    rect = last.find_all("rect")[0]
    assert abs(float(rect.attrs["x"]) + float(rect.attrs["width"]) - (LABEL_WIDTH + PLOT_WIDTH)) < 0.2
    vbd, vif = root.find_all("section", "device")
    assert "handshake not completed" in vbd.all_text() and "handshake not completed" not in vif.all_text()
    assert all("stuck" not in g.classes and g.attrs["data-connected"] == "true" for g in vif.find_all("g", "lane"))


def test_a_side_never_seen_is_an_empty_flagged_lane():
    _, root = page([(0.1, B, "vbd/51712", 1), (0.3, B, "vbd/51712", 2)])
    frontend = lanes(root)["vbd/51712 frontend"]
    assert states(frontend) == [] and frontend.find_all("text", "flag")[0].text == "never seen"


def test_odd_names_are_escaped():
    odd = "<b>x</b>"
    changes = [Change(0.1, "backend", odd, 'a"&\'', 1, 1), Change(0.2, "frontend", odd, 'a"&\'', 1, 1)]
    html = render_html(changes, check(changes), "<script>alert('t')</script> & more")
    assert "<script>" not in html and "<b>x</b>" not in html
    assert "&lt;script&gt;" in html and "&amp; more" in html
    root = parse_dom(html)
    assert root.find_all("title")[0].text.startswith("<script>alert(")  # the text, as a reader sees it
    assert set(lanes(root)) == {f'{odd}/a"&\' frontend', f'{odd}/a"&\' backend'}
    assert root.find_all("section", "device")[0].attrs["data-device"] == f'{odd}/a"&\''


def test_no_change_and_one_instant_both_render():
    html = render_html([], [], "nothing")
    assert "No XenBus device state was seen" in html and "<svg" not in html
    # A snapshot: every state read at start, all at one moment.
    _, root = page([(0.0, B, "vbd/51712", 4, "i"), (0.0, F, "vbd/51712", 2, "i")])
    rects = [r for g in root.find_all("g", "seg") for r in g.find_all("rect")]
    assert len(rects) == 2 and all(float(r.attrs["width"]) > PLOT_WIDTH / 2 for r in rects)


def test_chromium_draws_the_lanes_and_state_colours(tmp_path):
    changes = real_paths(timeline(STUCK))
    html_path, png_path = tmp_path / "timeline.html", tmp_path / "timeline.png"
    html_path.write_text(render_html(changes, check(changes), "stuck vbd, connected vif"))
    root = parse_dom(render_in_chromium(html_path, png_path))
    found = lanes(root)
    assert set(found) == {"vbd/51712 frontend", "vbd/51712 backend", "vif/0 frontend", "vif/0 backend"}
    assert states(found["vif/0 backend"]) == ["Initialising", "InitWait", "Connected"]
    assert states(found["vbd/51712 backend"]) == ["Initialising", "InitWait"]
    assert found["vbd/51712 backend"].attrs["data-connected"] == "false" and found["vif/0 frontend"].attrs["data-connected"] == "true"
    colours = png_colours(png_path)
    for state in (CONNECTED, INITWAIT):
        # Hundreds of pixels: a drawn segment, not the legend's swatch alone.
        assert colours[state_colour(state)] > 2000, (STATE_NAMES[state], colours.most_common(12))


def test_trace_cli_has_html_and_refuses_a_bad_path_before_touching_a_lab(tmp_path):
    runner = CliRunner()
    assert "--html FILE" in runner.invoke(main, ["trace", "--help"]).output
    for target, text in ((tmp_path, "is a directory"), (tmp_path / "missing" / "t.html", "does not exist")):
        result = runner.invoke(main, ["trace", "g1", "--lab", "never-up-unit", "--for", "1", "--html", str(target)],
                               env={"XENLAB_STATE": str(tmp_path / "state")})
        assert result.exit_code == 2 and text in result.output, result.output
    assert not (tmp_path / "state").exists()


def test_verify_writes_a_page_per_trace_beside_its_report(tmp_path):
    from xenlab.verify.reports import write_timelines

    traces = {"create": real_paths(timeline(CREATE)), "destroy": real_paths(timeline(DESTROY, released_at=12.444))}
    written = write_timelines(traces, tmp_path / "verify.json", "verify")
    assert written == [str(tmp_path / "verify-xenbus-create.html"), str(tmp_path / "verify-xenbus-destroy.html")]
    create = parse_dom((tmp_path / "verify-xenbus-create.html").read_text())
    assert states(lanes(create)["vif/0 backend"]) == ["Initialising", "InitWait", "Connected"]
    assert "guest verify (destroy)" in (tmp_path / "verify-xenbus-destroy.html").read_text()


class FakeWatch:
    def get(self, timeout):
        time.sleep(min(timeout, 0.01))

    def drain(self):
        return []

    def close(self):
        pass


class FakeStore:
    """Just what XenBusRecorder reads at start: a lab with one guest whose vbd is stuck."""

    def __init__(self, nodes):
        self.nodes = nodes

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def watch(self, *paths):
        return FakeWatch()

    def ls(self, path):
        prefix = path.rstrip("/") + "/"
        return sorted({p[len(prefix):].split("/")[0] for p in self.nodes if p.startswith(prefix)})

    def exists(self, path):
        return any(p == path or p.startswith(path + "/") for p in self.nodes)

    def read(self, path, default=None):
        return self.nodes.get(path, default)


def test_plugin_artifact_page_draws_the_states_found_at_failure(monkeypatch):
    from xenlab.diagnostics import xenbus_states_page
    from xenlab.xenstore.client import XenStore

    nodes = {
        "/local/domain/0/name": "Domain-0", "/local/domain/3/name": "g1",
        "/local/domain/0/backend/vbd/3/51712/state": "2", "/local/domain/3/device/vbd/51712/state": "1",
        "/local/domain/0/backend/vif/3/0/state": "4", "/local/domain/3/device/vif/0/state": "4",
    }
    monkeypatch.setattr(XenStore, "for_lab", classmethod(lambda cls, lab, timeout=10: FakeStore(nodes)))
    lab = type("Lab", (), {"name": "unit"})()
    root = parse_dom(xenbus_states_page(lab))
    found = lanes(root)
    assert states(found["vbd/51712 backend"]) == ["InitWait"] and "stuck" in found["vbd/51712 backend"].classes
    assert found["vbd/51712 backend"].find_all("text", "lane-label")[0].text == "vbd/51712 backend (d0)"
    assert states(found["vif/0 frontend"]) == ["Connected"] and "stuck" not in found["vif/0 frontend"].classes
    assert root.find_all("section", "device")[0].attrs["data-domid"] == "3"
