"""Was it a crash? After a check that did not succeed, verify asks whether
Xen, dom0, the lab VM or the guest crashed, and marks what is no longer
worth trying."""

from __future__ import annotations

from xenlab.agent import facts
from xenlab.agent.xl import parse_xl_list
from xenlab.diagnostics import GUEST_PANIC, guest_crash, serial_crash, serial_stall
from xenlab.errors import XenlabError
from xenlab.run import tail
from xenlab.verify.model import Context


def detect_crash(ctx: Context, message: str = "") -> tuple[str, str] | None:
    """(what crashed, log tail) if the hypervisor, dom0, the lab VM or the guest crashed."""
    lab = ctx.lab
    try:
        text = lab.fresh_serial_log().read_text(errors="replace")
    except OSError:
        text = ""
    ctx.lab_stalled = serial_stall(text) or ctx.lab_stalled  # read here, with the crash verdict, once
    found = serial_crash(text)
    if found:
        ctx.lab_crashed = found[0]
        return f"lab crashed: {found[0]}", f"--- {lab.serial_log} ---\n{found[1]}"
    try:
        running = lab.running()
    except Exception:  # noqa: BLE001 - libvirt trouble is not a crash verdict
        running = True
    if not running:
        ctx.lab_crashed = "the lab VM is gone"
        return "the lab VM stopped", f"--- {lab.serial_log} ---\n{tail(text, 40)}"
    m = next((m for p in GUEST_PANIC if (m := p.search(message))), None)
    if m:
        ctx.guest_crashed = m.group(0)[:200]
        return f"guest {ctx.guest} crashed: {m.group(0)[:200]}", message[-4000:]
    if ctx.guests is None:
        return None  # no guest made yet: a console log there is an older run's
    log = facts.CONSOLE_LOG.format(name=ctx.guest)
    try:
        with lab.ssh(timeout=10) as ssh:
            state = next((d["state"] for d in parse_xl_list(ssh.check("xl list")) if d["name"] == ctx.guest), None)
            console = ssh.run(f"tail -n 60 {log} 2>/dev/null").stdout
    except XenlabError:
        return None
    what = guest_crash(console, state)
    if what:
        ctx.guest_crashed = what
        return f"guest {ctx.guest} crashed: {what}", f"--- console of {ctx.guest} (dom0: {log}) ---\n{console}"
    return None

