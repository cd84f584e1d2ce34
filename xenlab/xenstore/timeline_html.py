"""The XenBus timeline as one self-contained HTML page (inline CSS and SVG,
no script, nothing fetched): a lane per frontend and per backend of each
device, every state a coloured segment, findings marked on the lanes.

A state lasts until the lane's next change; the last one runs to the end of
the picture, so a handshake that stopped half-way shows as a long segment,
and a lane that never reached Connected is flagged."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xenlab.agent.facts import CONNECTED, STATE_NAMES, state_name
from xenlab.templates import render
from xenlab.xenstore.paths import BACKEND_STATE
from xenlab.xenstore.tracer import Change, DeviceReport, format_timeline

TEMPLATE = "xenbus-timeline.html.j2"

# Indexed by state number; distinct hues, none of them the red of violations.
STATE_COLOURS = ("#9e9e9e", "#f7dc6f", "#f39c12", "#5dade2", "#27ae60", "#a569bd", "#5d6d7e", "#48c9b0", "#1a5276")
OTHER_COLOUR = "#bcaaa4"  # a number xenbus.h does not name

WIDTH, LABEL_WIDTH, RIGHT_MARGIN = 1320, 300, 20
PLOT_WIDTH = WIDTH - LABEL_WIDTH - RIGHT_MARGIN
AXIS_HEIGHT, LANE_HEIGHT, BAR_HEIGHT = 22, 38, 26
CHAR_WIDTH = 7  # of a 12 px label: a state name shows only where it fits


def state_colour(state: int) -> str:
    return STATE_COLOURS[state] if 0 <= state < len(STATE_COLOURS) else OTHER_COLOUR


def _text_colour(background: str) -> str:
    r, g, b = (int(background[i:i + 2], 16) for i in (1, 3, 5))
    return "#111" if 0.299 * r + 0.587 * g + 0.114 * b > 150 else "#fff"


@dataclass
class Segment:
    state: int
    name: str
    start: float
    end: float
    open: bool  # still in this state when the recording ended
    maybe_skipped: bool
    initial: bool  # already there when the trace started
    x: float = 0
    width: float = 0
    colour: str = ""
    text_colour: str = ""
    label: bool = False


@dataclass
class Lane:
    side: str
    device: str
    domid: int  # the frontend's domain
    side_domid: int | None  # the domain this side runs in, when its path tells
    segments: list[Segment] = field(default_factory=list)
    removed_at: list[float] = field(default_factory=list)
    removed_x: list[float] = field(default_factory=list)
    connected: bool = False
    flag: str = ""

    @property
    def name(self) -> str:
        return f"{self.device} {self.side}"

    @property
    def label(self) -> str:
        return self.name + (f" (d{self.side_domid})" if self.side_domid is not None else "")


@dataclass
class Marker:
    number: int
    level: str
    message: str
    t: float | None
    side: str | None
    x: float | None = None


def _lane(timeline: list[Change], report: DeviceReport, side: str, end: float) -> Lane:
    changes = [c for c in timeline if c.side == side and c.domid == report.domid and c.device == report.device]
    side_domid = report.domid if side == "frontend" else None
    if side == "backend":
        side_domid = next((int(m.group(1)) for c in changes if (m := BACKEND_STATE.match(c.path))), None)
    lane = Lane(side, report.device, report.domid, side_domid)
    current: Segment | None = None
    for c in changes:
        if current is not None and c.state == current.state:
            continue  # the same value written again
        if current is not None:
            current.end, current.open = c.t, False
            current = None
        if c.state is None:
            lane.removed_at.append(c.t)
            continue
        current = Segment(c.state, state_name(c.state), c.t, end, True, c.maybe_skipped, c.initial)
        lane.segments.append(current)
    lane.connected = any(s.state == CONNECTED for s in lane.segments)
    if not changes:
        lane.flag = "never seen"
    elif not lane.connected:
        last = lane.segments[-1] if lane.segments and lane.segments[-1].open else None
        lane.flag = "never Connected" + (f" (stuck in {last.name})" if last else "")
    return lane


def _ticks(start: float, end: float) -> list[tuple[float, str]]:
    raw = (end - start) / 10
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    decimals = max(0, -math.floor(math.log10(step)))
    count = int((end - start) / step + 1e-9)
    return [(start + i * step, f"{i * step:.{decimals}f}") for i in range(count + 1)]


def render_html(timeline: list[Change], reports: list[DeviceReport], title: str) -> str:
    """The page for a recorded timeline and its checked reports (tracer.check)."""
    start = min((c.t for c in timeline), default=0.0)
    last = max((c.t for c in timeline), default=0.0)
    span = last - start
    end = last + (span * 0.08 or 1.0)  # room for the last states to show

    def x(t: float) -> float:
        return round(LABEL_WIDTH + (t - start) / (end - start) * PLOT_WIDTH, 1)

    devices: list[dict[str, Any]] = []  # the template's view of each device
    number = 0
    for report in reports:
        lanes = [_lane(timeline, report, side, end) for side in ("frontend", "backend")]
        for lane in lanes:
            lane.removed_x = [x(t) for t in lane.removed_at]
            for s in lane.segments:
                s.x, s.width = x(s.start), round(x(s.end) - x(s.start), 1)
                s.colour = state_colour(s.state)
                s.text_colour = _text_colour(s.colour)
                s.label = s.width >= len(s.name) * CHAR_WIDTH + 8
        markers = []
        for f in report.findings:
            number += 1
            change = f.change
            markers.append(Marker(number, f.level, f.message, change.t if change else None, change.side if change else None,
                                  x(change.t) if change else None))
        released = [x(c.t) for c in timeline if c.side == "domain" and c.domid == report.domid]
        devices.append({
            "report": report, "lanes": lanes, "markers": markers, "released": released,
            "height": AXIS_HEIGHT + LANE_HEIGHT * len(lanes) + 6,
            "backend": " -> ".join(state_name(s) for s in report.backend) or "nothing seen",
            "frontend": " -> ".join(state_name(s) for s in report.frontend) or "nothing seen",
        })
    ticks = [(x(t), text) for t, text in _ticks(start, end)] if timeline else []
    legend = [(name, state_colour(n)) for n, name in enumerate(STATE_NAMES)]
    return render(
        TEMPLATE, title=title, devices=devices, ticks=ticks, legend=legend, span=span, changes=len(timeline),
        lines=format_timeline(timeline), width=WIDTH, plot_end=LABEL_WIDTH + PLOT_WIDTH,
        axis_height=AXIS_HEIGHT, lane_height=LANE_HEIGHT, bar_height=BAR_HEIGHT, other_colour=OTHER_COLOUR,
        violations=sum(not r.ok for r in reports), stuck=sum(bool(lane.flag) for d in devices for lane in d["lanes"]),
    )


def write_html(path, timeline: list[Change], reports: list[DeviceReport], title: str) -> None:
    Path(path).write_text(render_html(timeline, reports, title))
