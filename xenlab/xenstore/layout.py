"""The XenStore layout of a split driver, checked for every vbd and vif of a domain:

    <backend-domain>/backend/<class>/<domid>/<devid>/{frontend, frontend-id, state}
    /local/domain/<domid>/device/<class>/<devid>/{backend, backend-id, state}

each side pointing at the other, and the frontend's published ring grant
reference(s) and event channel (single ring, multi-page ring-ref<N>, or
per-queue queue-<N>/ directories)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from xenlab.xenstore.client import XenStore
from xenlab.xenstore.tracer import state_name

KINDS = ("vbd", "vif")
BACKEND_CLASSES = {"vbd": ("vbd", "qdisk", "vbd3"), "vif": ("vif",)}
RING_KEYS = {"vbd": (r"ring-ref\d*",), "vif": (r"tx-ring-ref", r"rx-ring-ref")}
EVTCHN_KEYS = {"vbd": ("event-channel",), "vif": ("event-channel", "event-channel-tx")}


@dataclass
class DeviceLayout:
    kind: str
    devid: str
    domid: int
    frontend: str
    backend: str | None = None
    backend_domid: int | None = None
    frontend_state: str | None = None
    backend_state: str | None = None
    rings: dict[str, str] = field(default_factory=dict)  # key (relative to the frontend) -> grant ref
    event_channels: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**self.__dict__, "ok": self.ok}


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def check_domain(xs: XenStore, domid: int) -> list[DeviceLayout]:
    """Every vbd and vif of domain `domid`, frontends and backends both ways."""
    results = []
    frontends = set()
    for kind in KINDS:
        base = f"/local/domain/{domid}/device/{kind}"
        for devid in xs.ls(base) if xs.exists(base) else []:
            frontends.add((kind, devid))
            results.append(check_device(xs, domid, kind, devid))
    # A backend without its frontend is a layout fault too (seen from dom0's side).
    for kind in KINDS:
        for cls in BACKEND_CLASSES[kind]:
            base = f"/local/domain/0/backend/{cls}/{domid}"
            for devid in xs.ls(base) if xs.exists(base) else []:
                if (kind, devid) not in frontends:
                    orphan = DeviceLayout(kind, devid, domid, f"/local/domain/{domid}/device/{kind}/{devid}", f"{base}/{devid}", 0)
                    orphan.problems.append(f"backend {base}/{devid} exists but the frontend directory {orphan.frontend} does not")
                    results.append(orphan)
    return results


def check_device(xs: XenStore, domid: int, kind: str, devid: str) -> DeviceLayout:
    fe = f"/local/domain/{domid}/device/{kind}/{devid}"
    d = DeviceLayout(kind, devid, domid, fe)
    p = d.problems
    fe_keys = set(xs.ls(fe))
    for key in ("backend", "backend-id", "state"):
        if key not in fe_keys:
            p.append(f"frontend {fe} has no '{key}'")
    d.backend = xs.read(f"{fe}/backend", None)
    d.backend_domid = _int(xs.read(f"{fe}/backend-id", None))
    d.frontend_state = state_name(_int(xs.read(f"{fe}/state", None)))
    if "backend-id" in fe_keys and d.backend_domid is None:
        p.append(f"{fe}/backend-id is not a domain id")
    be = d.backend
    if be is not None:
        m = re.match(rf"^/local/domain/(\d+)/backend/([\w-]+)/{domid}/{re.escape(devid)}$", be)
        if not m:
            p.append(f"{fe}/backend = {be!r} is not /local/domain/<id>/backend/<class>/{domid}/{devid}")
        elif d.backend_domid is not None and int(m.group(1)) != d.backend_domid:
            p.append(f"{fe}/backend-id = {d.backend_domid} but backend {be} lives in domain {m.group(1)}")
        if not xs.exists(be):
            p.append(f"backend directory {be} (named by {fe}/backend) does not exist")
        else:
            be_keys = set(xs.ls(be))
            for key in ("frontend", "frontend-id", "state"):
                if key not in be_keys:
                    p.append(f"backend {be} has no '{key}'")
            back_to = xs.read(f"{be}/frontend", None)
            if back_to is not None and back_to != fe:
                p.append(f"{be}/frontend = {back_to!r}, not {fe}")
            fid = xs.read(f"{be}/frontend-id", None)
            if fid is not None and _int(fid) != domid:
                p.append(f"{be}/frontend-id = {fid!r}, not {domid}")
            d.backend_state = state_name(_int(xs.read(f"{be}/state", None)))
    _published(xs, d, fe, fe_keys)
    return d


def _published(xs: XenStore, d: DeviceLayout, fe: str, fe_keys: set[str]) -> None:
    """The frontend's ring grant refs and event channel(s), top level or per queue."""
    dirs = [("", fe_keys)]
    queues = sorted(k for k in fe_keys if re.fullmatch(r"queue-\d+", k))
    dirs += [(q + "/", set(xs.ls(f"{fe}/{q}"))) for q in queues]
    for prefix, keys in dirs:
        for pattern in RING_KEYS[d.kind]:
            for key in sorted(k for k in keys if re.fullmatch(pattern, k)):
                d.rings[prefix + key] = xs.read(f"{fe}/{prefix}{key}", "")
        for key in EVTCHN_KEYS[d.kind]:
            if key in keys:
                d.event_channels[prefix + key] = xs.read(f"{fe}/{prefix}{key}", "")
    if d.kind == "vif":
        for needed in RING_KEYS["vif"]:
            if not any(k.endswith(needed) for k in d.rings):
                d.problems.append(f"frontend {fe} published no {needed}")
    elif not d.rings:
        d.problems.append(f"frontend {fe} published no ring-ref")
    if not d.event_channels:
        d.problems.append(f"frontend {fe} published no event-channel")
    for key, value in {**d.rings, **d.event_channels}.items():
        if (number := _int(value)) is None or number <= 0:
            d.problems.append(f"{fe}/{key} = {value!r} is not a positive number")
