"""What dom0 knows of its guests, shared by the agent's toolstack commands
(domctl), the console exec and the block backends: `xl`, a guest's domid,
directory, recorded meta and devices, and its console log."""

from __future__ import annotations

import json
import os
import subprocess
import time

from . import facts
from .errors import AgentError
from .facts import CONSOLE_LOG, EXEC_CHUNK_TAG, EXEC_REPLY_TAG, GUESTS_DIR
from .xs import XenStore

CONNECTED = str(facts.CONNECTED)  # as XenStore holds it


class Refused(AgentError):
    pass


def xl(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(["xl", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise Refused(f"`xl {' '.join(args)}` failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
    return proc


def domid_of(name: str) -> int | None:
    proc = xl("domid", name, check=False)
    return int(proc.stdout) if proc.returncode == 0 and proc.stdout.strip().isdigit() else None


def guest_dir(name: str) -> str:
    return os.path.join(GUESTS_DIR, name)


def read_meta(name: str) -> dict | None:
    try:
        with open(os.path.join(guest_dir(name), "meta.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def devices(store: XenStore, domid: int) -> list[dict]:
    """Every frontend of the domain with its backend and both states."""
    out = []
    base = f"/local/domain/{domid}/device"
    for kind in store.try_directory(base):
        if kind not in ("vbd", "vif"):
            continue  # the console is not a XenBus split device here
        for devid in store.try_directory(f"{base}/{kind}"):
            front = f"{base}/{kind}/{devid}"
            back = store.try_read(f"{front}/backend") or ""
            out.append({
                "kind": kind, "devid": devid, "frontend": front, "backend": back,
                "frontend_state": store.try_read(f"{front}/state"),
                "backend_state": store.try_read(f"{back}/state") if back else None,
            })
    return out


def console_text(name: str) -> str:
    try:
        with open(CONSOLE_LOG.format(name=name), "rb") as f:
            return f.read().decode(errors="replace").replace("\r", "")
    except FileNotFoundError:
        return ""


def console_tail(name: str, lines: int = 25) -> str:
    text = [line for line in console_text(name).splitlines() if not line.startswith((EXEC_REPLY_TAG + " ", EXEC_CHUNK_TAG + " "))]
    return "\n".join(text[-lines:])



def wait_nodes(xs: XenStore, paths: list[str], gone: bool, timeout: float) -> list[str]:
    """Of `paths` (device directories), those not yet removed (gone) or not
    yet Connected, after at most `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        if gone:
            left = [p for p in paths if xs.try_read(p) is not None]
        else:
            left = [p for p in paths if xs.try_read(f"{p}/state") != CONNECTED]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)
