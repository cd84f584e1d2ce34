"""Fault plans: what a misbehaving block backend does to test how hardened a
frontend is. Parsing only; blkback.py carries the faults out.

Grammar (`--faults PLAN`):

    PLAN  := ITEM ("," ITEM)*
    ITEM  := NAME [":" PARAM (";" PARAM)*]
    PARAM := KEY "=" VALUE

e.g. `io-error:sectors=0-7;op=write,slow:ms=50`. Several parameters of one
fault are separated by ";" (quote the plan in a shell), faults by ",".
Blanks around the separators are ignored. A missing parameter takes its
default from FAULTS. A file holds one or more items per line (commas work
too); "#" starts a comment. Only io-error may appear more than once (each
with its own sectors and op); a second copy of any other fault is an error.

Counters: `every=N` fires on the Nth, 2Nth, ... event the fault counts;
`after=N` fires once, when N requests have been answered (0: right after
connecting)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .blkif import BLKIF_OP_DISCARD, BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, FEATURE_MAX_INDIRECT_SEGMENTS, MAX_RING_PAGE_ORDER
from .facts import CLOSED, INITWAIT


class FaultPlanError(ValueError):
    """A plan that does not parse; `item` is the offending item, `line` its line in a file."""

    def __init__(self, message: str, item: str = "", line: int | None = None, source: str = ""):
        where = f"{source}:{line}: " if line is not None else ""
        super().__init__(f"{where}{message}")
        self.item, self.line = item, line


@dataclass(frozen=True)
class SectorRange:
    """Sectors first..last, both included."""
    first: int
    last: int

    def overlaps(self, sector: int, count: int) -> bool:
        """Whether sectors sector..sector+count-1 touch this range (count 0 touches nothing)."""
        return count > 0 and sector <= self.last and sector + count - 1 >= self.first

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass(frozen=True)
class Param:
    kind: str  # "count" (whole number >= minimum), "int" (any whole number), "range", "choice"
    default: object
    minimum: int = 0
    choices: tuple[str, ...] = ()
    placeholder: str = "N"  # how help texts and FAULTS' descriptions write the value

    def allowed(self) -> str:
        return {"count": f"a whole number >= {self.minimum}", "int": "a whole number",
                "range": "a sector or FIRST-LAST with FIRST <= LAST", "choice": "|".join(self.choices)}[self.kind]

    def parse(self, text: str):
        if self.kind == "choice":
            return text if text in self.choices else None
        if self.kind == "range":
            m = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", text)
            if not m:
                return None
            first = int(m.group(1))
            last = int(m.group(2)) if m.group(2) is not None else first
            return SectorRange(first, last) if first <= last else None
        if not re.fullmatch(r"-?[0-9]+" if self.kind == "int" else r"[0-9]+", text):
            return None
        value = int(text)
        return value if self.kind == "int" or value >= self.minimum else None


def _every(default: int = 10) -> Param:
    return Param("count", default, minimum=1)


def _after(default: int = 10) -> Param:
    return Param("count", default, minimum=0)


@dataclass(frozen=True)
class FaultKind:
    what: str  # what the backend does
    must: str  # what a hardened frontend must do about it
    params: dict[str, Param] = field(default_factory=dict)
    repeatable: bool = False


# The one table of faults: name -> what happens, what a hardened frontend must do, parameters.
FAULTS: dict[str, FaultKind] = {
    "io-error": FaultKind(
        "answers BLKIF_RSP_ERROR to OP requests touching sectors RANGE",
        "fail just those I/Os with EIO and keep the disk usable",
        {"sectors": Param("range", None, placeholder="RANGE"), "op": Param("choice", "any", choices=("read", "write", "any"), placeholder="OP")},
        repeatable=True),
    "slow": FaultKind(
        "delays every response by MS milliseconds",
        "keep waiting without timing out early, resending or completing twice",
        {"ms": Param("count", 50, placeholder="MS")}),
    "lost-notify": FaultKind(
        "skips every Nth event it would send for new responses",
        "complete those responses at the next event, losing or duplicating none",
        {"every": _every()}),
    "extra-notify": FaultKind(
        "sends a spurious event after every Nth batch of responses",
        "treat an event with no new responses as a no-op",
        {"every": _every()}),
    "unknown-id": FaultKind(
        "answers every Nth request under an id that was never issued, instead of its own",
        "reject it without completing or indexing anything by that id",
        {"every": _every()}),
    "duplicate-response": FaultKind(
        "answers every Nth request twice",
        "ignore the second answer: no double completion, no use after free",
        {"every": _every()}),
    "rsp-prod-past-req-prod": FaultKind(
        "publishes rsp_prod beyond the requests issued, after N requests",
        "see rsp_prod - rsp_cons above the requests in flight and stop reading the ring",
        {"after": _after()}),
    "bad-ring-page-order": FaultKind(
        f"publishes {MAX_RING_PAGE_ORDER}=VALUE",
        "clamp it to what it supports or refuse to connect; never size a ring from it unchecked",
        {"value": Param("int", 32, placeholder="VALUE")}),
    "bad-max-indirect-segments": FaultKind(
        f"publishes {FEATURE_MAX_INDIRECT_SEGMENTS}=VALUE",
        "cap it at its own limit and at the 8 indirect pages a request can carry",
        {"value": Param("int", 0xFFFFFFFF, placeholder="VALUE")}),
    "unmappable-grant": FaultKind(
        "treats the grants of every Nth request as unmappable and answers BLKIF_RSP_ERROR",
        "fail that I/O only, and still end its grant access",
        {"every": _every()}),
    "state-jump": FaultKind(
        "jumps its XenBus state to TO once it answered N requests and request N+1 is in flight (closed: never answered)",
        "fail or requeue the I/O in flight and follow the state without hanging or crashing",
        {"to": Param("choice", "closed", choices=("closed", "initwait"), placeholder="TO"), "after": _after()}),
}

STATE_JUMP_TARGETS = {"closed": CLOSED, "initwait": INITWAIT}  # `to` names -> XenBus states
IO_ERROR_OPS = {  # io-error's `op` -> the blkif operations it hits (an indirect request counts as its indirect_op)
    "read": (BLKIF_OP_READ,),
    "write": (BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER),
    "any": (BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_DISCARD),
}


@dataclass(frozen=True)
class Fault:
    name: str
    params: dict = field(default_factory=dict)  # every key of FAULTS[name].params, defaults filled in

    def __getitem__(self, key: str):
        return self.params[key]

    @property
    def kind(self) -> FaultKind:
        return FAULTS[self.name]

    def fires(self, count: int) -> bool:
        """Whether the fault hits the count-th event (every=N), or now that count
        requests were answered (after=N); faults without a counter always apply."""
        if "every" in self.params:
            return count > 0 and count % self.params["every"] == 0
        if "after" in self.params:
            return count == self.params["after"]
        return True

    def matches(self, operation: int, sector: int, count: int) -> bool:
        """io-error: whether a request (operation, sectors sector..sector+count-1) is hit."""
        if self.name != "io-error":
            raise ValueError(f"{self.name} has no sector range; matches() is io-error's")
        sectors = self.params["sectors"]
        in_range = count > 0 if sectors is None else sectors.overlaps(sector, count)
        return in_range and operation in IO_ERROR_OPS[self.params["op"]]

    def __str__(self) -> str:
        """The item as it would be written (defaults included), parseable again."""
        parts = [f"{k}={v}" for k, v in self.params.items() if v is not None]  # None: io-error's "all sectors"
        return self.name + (":" + ";".join(parts) if parts else "")


def _parse_item(item: str) -> Fault:
    name, _, rest = item.partition(":")
    name = name.strip()
    kind = FAULTS.get(name)
    if kind is None:
        hint = f" (to read a file, write ./{name})" if name and os.path.isfile(name) else ""
        raise FaultPlanError(f"unknown fault {name!r} in {item!r}; known: {', '.join(FAULTS)}{hint}", item)
    values: dict = {}
    for param in (p.strip() for p in rest.split(";")) if rest.strip() else ():
        key, eq, text = (s.strip() for s in param.partition("="))
        if not eq or not key:
            raise FaultPlanError(f"{name}: {param!r} in {item!r} is not KEY=VALUE", item)
        spec = kind.params.get(key)
        if spec is None:
            allowed = ", ".join(kind.params) if kind.params else "none"
            raise FaultPlanError(f"{name}: unknown key {key!r} in {item!r}; allowed: {allowed}", item)
        if key in values:
            raise FaultPlanError(f"{name}: {key} given twice in {item!r}", item)
        value = spec.parse(text)
        if value is None:
            what = "bad range" if spec.kind == "range" else "bad value"
            raise FaultPlanError(f"{name}: {what} {key}={text!r} in {item!r}; allowed: {spec.allowed()}", item)
        values[key] = value
    return Fault(name, {key: values.get(key, spec.default) for key, spec in kind.params.items()})


def _parse_items(text: str, seen: set[str], line: int | None = None, source: str = "") -> list[Fault]:
    faults = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise FaultPlanError(f"empty item in {text.strip()!r} (two commas in a row, or one at an end?)", item, line, source)
        try:
            fault = _parse_item(item)
        except FaultPlanError as e:
            raise FaultPlanError(str(e), item, line, source) from None
        if fault.name in seen and not fault.kind.repeatable:
            raise FaultPlanError(f"{fault.name} given twice; only io-error may repeat", item, line, source)
        seen.add(fault.name)
        faults.append(fault)
    return faults


def parse_plan(text: str) -> list[Fault]:
    """Faults of a one-line plan such as 'io-error:sectors=0-7;op=write,slow:ms=50'."""
    if not text.strip():
        raise FaultPlanError(f"empty fault plan; known faults: {', '.join(FAULTS)}")
    return _parse_items(text, set())


def parse_plan_lines(text: str, source: str = "<plan>") -> list[Fault]:
    """The file form: items on lines, '#' comments, blank lines ignored; errors name the line."""
    faults: list[Fault] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            faults += _parse_items(line, seen, number, source)
    return faults


def load_plan(plan: str | os.PathLike) -> list[Fault]:
    """A plan from a file (a Path, or a string with a '/' in it: ./faults.plan)
    or from plan text. A fault name never contains '/', so the two never clash."""
    if isinstance(plan, os.PathLike) or "/" in plan:
        path = Path(plan)
        try:
            text = path.read_text()
        except OSError as e:
            raise FaultPlanError(f"cannot read fault plan {path}: {e.strerror}") from None
        return parse_plan_lines(text, str(path))
    return parse_plan(plan)


def format_plan(faults: list[Fault]) -> str:
    """The plan as one line, parseable again."""
    return ",".join(str(f) for f in faults)


def describe_faults() -> list[str]:
    """One line per fault for help texts: its parameters and their defaults,
    what the backend does, what the frontend must do."""
    lines = []
    for name, kind in FAULTS.items():
        params = ";".join(f"{k}={p.allowed() if p.kind == 'choice' else p.placeholder}" for k, p in kind.params.items())
        defaults = ", ".join(f"{k}={'all' if p.default is None else p.default}" for k, p in kind.params.items())
        lines.append(f"{name}[:{params}] (default {defaults}): the backend {kind.what}; the frontend must {kind.must}")
    return lines
