"""Live XenBus tracing: one watch on /local/domain (and @releaseDomain)
records every change of every device's frontend and backend `state` node.

One watch over the whole domain tree, not one per device: a device's nodes
are created while the trace runs (xl writes them all in one transaction),
and a per-device watch would be registered too late for the first states.
Reads are sent the moment their events arrive and answered in order
(pipelined), so the value read is as close to the event as SSH allows."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from xenlab.errors import XenStoreError
from xenlab.xenstore.client import XenStore
from xenlab.xenstore.paths import BACKEND_STATE, FRONTEND_STATE
from xenlab.xenstore.timeline_html import write_html
from xenlab.xenstore.tracer import CONNECTED, Change, TimelineFormatter, check, format_reports, violation_summary

# Backend classes whose frontend is another class name (qdisk serves vbd frontends).
FRONTEND_KIND = {"qdisk": "vbd", "vbd3": "vbd", "qnic": "vif"}
# The PV console's backend is xenconsoled and its frontend lives at
# /local/domain/<id>/console, outside XenBus's device/ tree: not a split device.
IGNORED_BACKENDS = {"console"}


def parse_state_path(path: str) -> tuple[str, str, str, int] | None:
    """(side, frontend kind, devid, frontend domid) for a state node's path."""
    if (m := BACKEND_STATE.match(path)) and m.group(2) not in IGNORED_BACKENDS:
        return "backend", FRONTEND_KIND.get(m.group(2), m.group(2)), m.group(4), int(m.group(3))
    if m := FRONTEND_STATE.match(path):
        return "frontend", m.group(2), m.group(3), int(m.group(1))
    return None


class XenBusRecorder:
    """Record state changes of one guest's devices (or every domain's, guest=None)."""

    def __init__(self, xs: XenStore, guest: str | None = None, on_change: Callable[[Change], None] | None = None):
        self.xs, self.guest, self.on_change = xs, guest, on_change
        self.timeline: list[Change] = []
        self.error: BaseException | None = None
        self._names: dict[int, str | None] = {}
        self._last: dict[str, int] = {}  # state path -> index of its last change in timeline
        self._released: set[int] = set()
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self.started = 0.0

    # -- lifecycle -------------------------------------------------------
    def start(self) -> XenBusRecorder:
        self.started = time.time()
        self._watch = self.xs.watch("/local/domain")
        self._release = self.xs.watch("@releaseDomain")
        self._baseline()
        self._thread = threading.Thread(target=self._run, name="xenbus-recorder", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[Change]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for w in (getattr(self, "_watch", None), getattr(self, "_release", None)):
            if w is not None:
                w.close()
        if self.error is not None:
            raise self.error
        return list(self.timeline)

    def __enter__(self) -> XenBusRecorder:
        return self.start()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        try:
            self.stop()
        except XenStoreError:
            if exc[0] is None:
                raise

    def wait(self, predicate: Callable[[list[Change]], bool], timeout: float) -> bool:
        """Block until predicate(timeline) holds; False after timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self.timeline):
                if self.error is not None:
                    raise self.error
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(min(remaining, 0.5))
        return True

    # -- recording -------------------------------------------------------
    def _wanted(self, domid: int) -> bool:
        if self.guest is None:
            return True
        if domid not in self._names or self._names[domid] is None:
            self._names[domid] = self.xs.read(f"/local/domain/{domid}/name", None)
        return self._names[domid] == self.guest

    def _baseline(self) -> None:
        """The states already there when the trace starts (a running guest)."""
        for domid in self.xs.ls("/local/domain"):
            if not domid.isdigit():
                continue
            for area, is_backend in (("backend", True), ("device", False)):
                base = f"/local/domain/{domid}/{area}"
                for kind in self.xs.ls(base) if self.xs.exists(base) else []:
                    for path in self._state_paths(f"{base}/{kind}", 2 if is_backend else 1):
                        parsed = parse_state_path(path)
                        if parsed and self._wanted(parsed[3]):
                            value = self.xs.read(path, None)
                            if value is not None:
                                self._record(path, parsed, value, time.time(), initial=True)

    def _state_paths(self, top: str, depth: int) -> list[str]:
        level = [top]
        for _ in range(depth):
            level = [f"{p}/{c}" for p in level for c in self.xs.ls(p)] if level else []
        return [f"{p}/state" for p in level]

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                event = self._watch.get(0.2)
                events = ([event] if event else []) + self._watch.drain()
                # Send every read now, then collect the answers in order.
                reads = []
                for ev in events:
                    for path, parsed in self._paths_for(ev.path):
                        reads.append((path, parsed, ev.time, path == ev.path, self.xs.read_async(path)))
                for path, parsed, when, direct, result in reads:
                    self._record(path, parsed, result(), when, direct=direct)
                for ev in self._release.drain():
                    self._check_released(ev.time)
        except BaseException as e:  # noqa: BLE001 - raised again by stop()/wait()
            self.error = e
        finally:
            with self._changed:
                self._changed.notify_all()

    def _paths_for(self, path: str) -> list[tuple[str, tuple]]:
        parsed = parse_state_path(path)
        if parsed:
            return [(path, parsed)] if self._wanted(parsed[3]) else []
        # A removed directory fires one event for itself, not for its children:
        # every state node under it is read again (and found gone).
        # Each path in _last parsed as a state node's when it was recorded.
        prefix = path.rstrip("/") + "/"
        return [(p, parsed) for p in self._last if p.startswith(prefix) and (parsed := parse_state_path(p)) is not None]

    def _check_released(self, when: float) -> None:
        for domid in {c.domid for c in self.timeline} - self._released:
            if not self.xs.is_introduced(domid):
                self._released.add(domid)
                self._append(Change(round(when - self.started, 4), "domain", "", "", domid, None))

    def _record(self, path: str, parsed: tuple, value: str | None, when: float, initial: bool = False, direct: bool = False) -> None:
        side, kind, devid, domid = parsed
        state = _to_state(value)
        last = self._last.get(path)
        if last is not None and self.timeline[last].state == state:
            # Two writes to the node, one value: the earlier read may have
            # jumped over a state written in between (watches carry no
            # values). Rereads for a parent's event prove nothing.
            if state is not None and direct and not self.timeline[last].initial:
                self.timeline[last] = _replace(self.timeline[last], maybe_skipped=True)
            return
        if last is None and state is None:
            return  # never seen and already gone
        self._last[path] = len(self.timeline)
        # The node's own event but no node to read: a write (not a removal,
        # which fires for the directory) whose value came too late to see.
        lost_write = state is None and direct
        self._append(Change(round(when - self.started, 4), side, kind, devid, domid, state, path, initial=initial, maybe_skipped=lost_write))

    def _append(self, change: Change) -> None:
        with self._changed:
            self.timeline.append(change)
            self._changed.notify_all()
        if self.on_change is not None:
            self.on_change(change)


def _to_state(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value.strip() or 0)
    except ValueError:
        return -1  # not a number: reported as an unknown state


def _replace(change: Change, **kw) -> Change:
    return replace(change, **kw)


@contextmanager
def traced(store: XenStore, guest: str | None, echo: Callable[[str], None] | None = None):
    """Record GUEST's XenBus state changes while the body runs (create,
    destroy, detach, ...). Yields the recorder; its timeline is complete
    after the block. `echo` gets each change as a timeline line."""
    fmt = TimelineFormatter()

    def show(change):
        if echo is not None:
            echo(fmt.line(change))

    recorder = XenBusRecorder(store, guest, on_change=show)
    with recorder:
        yield recorder


def _last_states(timeline: list[Change]) -> dict:
    last = {}
    for c in timeline:
        if c.side != "domain":
            last[(c.domid, c.device, c.side)] = c.state
    return last


def all_connected(timeline: list[Change]) -> bool:
    """Every frontend and backend seen is Connected (a bring-up has settled)."""
    last = _last_states(timeline)
    return bool(last) and all(s == CONNECTED for s in last.values())


def all_gone(timeline: list[Change]) -> bool:
    """Every state node seen has been removed (a teardown has settled)."""
    return all(s is None for s in _last_states(timeline).values())


def settled(devices_gone: bool) -> Callable[[list[Change]], bool]:
    """The predicate for XenBusRecorder.wait after a create (False) or a destroy (True)."""
    return all_gone if devices_gone else all_connected


@contextmanager
def trace_action(lab, guest: str, destroying: bool, echo: Callable[[str], None] | None = None, settle: float = 15, timeout: float = 10):
    """Trace GUEST's devices around the body (a create, or a destroy when
    `destroying`), wait for them to settle, print the verdict through `echo`
    and raise XenStoreError on a protocol violation."""
    with XenStore.for_lab(lab, timeout=timeout) as store, traced(store, guest, echo=echo) as recorder:
        yield recorder
        recorder.wait(settled(destroying), settle)
    reports = check(recorder.timeline)
    if echo:
        for line in format_reports(reports):
            echo(line)
    problem = violation_summary(reports)
    if problem:
        raise XenStoreError(problem, "the timeline above shows the offending transition")


def trace_guest(lab, guest: str, action: str = "watch", spec=None, duration: float = 0, settle: float = 15,
                timeout: float = 10, echo: Callable[[str], None] | None = None, html: Path | None = None) -> dict:
    """Trace GUEST's devices while creating it (action "create", with its
    GuestSpec), destroying it ("destroy"), or for `duration` seconds ("watch";
    0: until Ctrl-C). Returns the timeline, the per-device verdicts and what
    the action reported; `ok` is False on a protocol violation. With `html`,
    the timeline page is written there, also when the action fails (a create
    that never connects is the stuck handshake the page is for)."""
    from xenlab.guest.manager import Guests

    if action not in ("create", "destroy", "watch"):
        raise XenStoreError(f"unknown trace action {action!r}", "create, destroy or watch")
    result = None
    with XenStore.for_lab(lab, timeout=timeout) as store, Guests(lab) as guests:
        if action == "create":
            guests.prepare(spec)  # kernel and root built and shipped before the trace starts
        with traced(store, guest, echo=echo) as recorder:
            if action == "watch":
                try:
                    time.sleep(duration) if duration > 0 else threading.Event().wait()
                except KeyboardInterrupt:
                    pass
            else:
                try:
                    result = guests.create(spec) if action == "create" else guests.destroy(guest)
                except BaseException:
                    if html is not None:
                        failed = list(recorder.timeline)
                        write_html(html, failed, check(failed), f"XenBus states of guest {guest} ({action} FAILED, lab {lab.name})")
                    raise
                recorder.wait(settled(action == "destroy"), settle)
        timeline = list(recorder.timeline)
    reports = check(timeline)
    if html is not None:
        write_html(html, timeline, reports, f"XenBus states of guest {guest} ({action}, lab {lab.name})")
    return {"guest": guest, "action": action, "ok": violation_summary(reports) is None, "timeline": timeline,
            "devices": reports, "action_result": result}
