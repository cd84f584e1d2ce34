"""What went wrong in a lab: crash detection in Xen's, dom0's and a guest's
logs, and the artifacts saved after a failure (used by verify and the
pytest plugin)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from xenlab.agent.facts import CONSOLE_LOG, EXEC_CHUNK_TAG, EXEC_REPLY_TAG, GUEST_PANIC_PATTERNS
from xenlab.guest.manager import Guests
from xenlab.lab.serial import CRASH_PATTERNS, PLATFORM_TIMER_WRAP_S, STALL_PATTERN
from xenlab.run import tail

# On a guest's console, and in the dom0 agent's report of a crashed create ("crashed: ...").
GUEST_PANIC = GUEST_PANIC_PATTERNS + (re.compile(r"crashed: .*"),)


def serial_crash(text: str, lines: int = 40) -> tuple[str, str] | None:
    """A Xen panic or dom0 crash in the lab's serial log: (line, log tail)."""
    text = text.replace("\r", "")
    for pattern in CRASH_PATTERNS:
        m = pattern.search(text)
        if m:
            # The tail from the crash line on (what follows a panic is its backtrace).
            return m.group(0).strip(), tail(text[: m.start()], 10) + "\n" + "\n".join(text[m.start():].splitlines()[:lines])
    return None


def serial_stall(text: str) -> str | None:
    """The lab VM stopped running for minutes (not a crash; it went on): what
    Xen said of it, in a sentence, or None."""
    m = STALL_PATTERN.search(text)
    if not m:
        return None
    return (f"the lab VM stalled: Xen's platform timer wrapped {m.group(1)} times unseen "
            f"(Xen did not run for about {int(m.group(1)) * PLATFORM_TIMER_WRAP_S} s or more; a QEMU TCG stall, docs/verify.md#a-stalled-lab)")


def guest_crash(console_text: str, xl_state: str | None) -> str | None:
    """A crashed domU: xl's 'c' state flag, or a panic on its console."""
    for pattern in GUEST_PANIC_PATTERNS:
        m = pattern.search(console_text)
        if m:
            return m.group(0).strip()
    if xl_state and "c" in xl_state:
        return f"domain is in state {xl_state} (crashed) in `xl list`"
    return None


def xenbus_states_page(lab) -> str:
    """Every domain's XenBus device states as they are now, drawn as the
    tracer's timeline page: a handshake stuck half-way shows as flagged lanes."""
    from xenlab.xenstore.client import XenStore
    from xenlab.xenstore.recorder import traced
    from xenlab.xenstore.timeline_html import render_html
    from xenlab.xenstore.tracer import check

    with XenStore.for_lab(lab, timeout=10) as store, traced(store, None) as recorder:
        pass  # the states already there are all it records
    timeline = recorder.timeline
    return render_html(timeline, check(timeline), f"XenBus states in lab {lab.name} when the artifacts were saved")


SERIAL_MAX = 4 << 20  # bytes of the serial log's end kept per failed test


def save_artifacts(lab, folder: Path, lab_up: bool = True) -> list[str]:
    """Everything worth reading after a failure; each item on its own, so a dead
    lab still yields the serial log. Returns the file names written."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    written = []

    def save(name: str, produce) -> None:
        try:
            data = produce()
        except Exception as e:  # noqa: BLE001 - record why, keep collecting the rest
            data = f"could not collect {name}: {type(e).__name__}: {e}\n"
            name += ".error"
        (folder / name).write_text(data if isinstance(data, str) else data.decode(errors="replace"))
        written.append(name)

    def serial() -> bytes:
        path = lab.fresh_serial_log()
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - SERIAL_MAX))
            return f.read()

    save("serial.log", serial)
    if not lab_up or lab.info() is None:
        return written
    try:
        ssh = lab.ssh(timeout=10)
    except Exception as e:  # noqa: BLE001 - the lab may be what broke
        reason = f"no SSH to dom0: {e}"  # `e` is unbound once the except block ends
        save("dom0.error", lambda: reason)
        return written
    with ssh:
        def cmd(command: str):
            return lambda: (lambda r: r.stdout + (f"\n[exit {r.exit_status}] {r.stderr}" if r.exit_status else ""))(ssh.run(command, timeout=60))

        save("xl-dmesg.txt", cmd("xl dmesg"))
        save("xl-list.txt", cmd("xl list -v"))
        save("dom0-dmesg.txt", cmd("dmesg | tail -n 400"))
        save("xenstore.txt", cmd("xenstore-ls -f -p"))
        save("xenbus-timeline.html", lambda: xenbus_states_page(lab))
        console_dir, pattern = CONSOLE_LOG.rsplit("/", 1)
        prefix, suffix = pattern.split("{name}")
        names = ssh.run(f"ls {console_dir}/ 2>/dev/null").stdout.split()
        for log in sorted(n for n in names if n.startswith(prefix) and n.endswith(suffix)):
            name = log[len(prefix):-len(suffix)]
            # Lines of the console exec protocol are noise to a reader.
            save(f"console-{name}.log", cmd(f"tail -c 1000000 {console_dir}/{log} | grep -av -e '^{EXEC_REPLY_TAG} ' -e '^{EXEC_CHUNK_TAG} '"))
    written += _crashed_guest_cores(lab, folder)
    return written


def _crashed_guest_cores(lab, folder: Path) -> list[str]:
    """A core (with kernel and System.map) of each guest found crashed: the
    panic is then readable after the guest is gone (`xenlab debug core-log`)."""
    written = []
    try:
        with Guests(lab) as guests:
            for row in guests.list():
                if row.get("state") == "crashed":
                    taken = guests.dump_core(row["name"], folder / "cores")
                    written.append(str(Path(taken["core_dir"]).relative_to(folder)))
    except Exception as e:  # noqa: BLE001 - the rest of the artifacts matter more
        (folder / "cores.error").write_text(f"could not take crashed guests' cores: {type(e).__name__}: {e}\n")
        written.append("cores.error")
    return written
