"""Testing a frontend's hardening: attach a disk served by the Python block
backend with a fault plan, drive I/O through the guest's blkfront, and
observe what the guest did (I/O results, data, its kernel log) and what the
backend did (its report). Used by the e2e tests and bench/hardening_matrix.py.

The I/O runs in the background in the guest: a frontend that disables a
device leaves its I/O in flight forever, and the guest must go on."""

from __future__ import annotations

import re

from xenlab.guest.handle import Guest

WRITE_BLOCKS = 16  # 4 KiB direct writes: one request each, segments in the request
READ_BYTES = 65536  # one direct read of 16 segments (more than 11): an indirect request when offered
# One plan per fault, as the e2e tests and the support matrix run them.
STANDARD_PLANS = (
    "io-error:sectors=0-7;op=read", "slow:ms=100", "lost-notify:every=3", "extra-notify:every=1",
    "unknown-id:every=5", "duplicate-response:every=5", "rsp-prod-past-req-prod:after=5",
    "bad-ring-page-order:value=32", "bad-max-indirect-segments", "unmappable-grant:every=5",
    "state-jump:to=closed;after=5", "state-jump:to=initwait;after=5",
)
# What blkfront logs (after the disk's name) when it gives up on a device.
BLKFRONT_DISABLED = "disabled for further use"
GUEST_TROUBLE = re.compile(r"Kernel panic|Oops|BUG:|general protection|WARNING: CPU")


def run_io(guest: Guest, dev: str, wait: float = 20) -> dict:
    """Write WRITE_BLOCKS random blocks, then read them back in one request;
    what finished within `wait` seconds (or before blkfront disabled the
    device), whether the data came back intact, and the kernel log lines the
    guest printed meanwhile."""
    before = int(guest.exec("dmesg | wc -l").stdout.strip() or 0)
    script = (
        f"dd if=/dev/urandom of=/tmp/want bs=4096 count={WRITE_BLOCKS} 2>/dev/null; rm -f /tmp/got /tmp/io.done /tmp/w.rc /tmp/r.rc; "
        f"( dd if=/tmp/want of={dev} bs=4096 oflag=direct 2>/tmp/w.err; echo \"wrc=$?\" > /tmp/w.rc; "
        f"  dd if={dev} of=/tmp/got bs={READ_BYTES} count=1 iflag=direct 2>/tmp/r.err; echo \"rrc=$?\" > /tmp/r.rc; touch /tmp/io.done ) "
        f">/dev/null 2>&1 &"
    )
    started = guest.exec(script)
    if not started.ok:
        raise AssertionError(f"could not start I/O in {guest.name}: {started.stderr}")
    # blkfront keeps the I/O of a device it disabled pending for good: waiting
    # the whole `wait` for it tells nothing more (a check each half second).
    disabled = f"dmesg | tail -n +{before + 1} | grep -q '{dev.removeprefix('/dev/')} {BLKFRONT_DISABLED}'"
    out = guest.exec(f"i=0; while [ ! -f /tmp/io.done ] && [ $i -lt {int(wait * 10)} ]; do "
                     f"if [ $((i % 5)) -eq 4 ] && {disabled}; then break; fi; sleep 0.1; i=$((i+1)); done; "
                     "cat /tmp/w.rc /tmp/r.rc /tmp/w.err /tmp/r.err 2>/dev/null; "
                     "cmp /tmp/want /tmp/got >/dev/null 2>&1 && echo SAME; echo ---; dmesg", timeout=wait + 60).stdout
    head, _, dmesg = out.partition("---\n")
    lines = [line for line in dmesg.splitlines()[before:] if line.strip()]
    return {
        "vdev": dev.removeprefix("/dev/"), "finished": "wrc=" in head and "rrc=" in head, "write_ok": "wrc=0" in head, "read_ok": "rrc=0" in head,
        "same": "SAME" in head, "out": head.strip(), "kernel_log": lines,
    }


def probe(guest: Guest, plan: str, size: str = "8M", wait: float = 20) -> dict:
    """One fault plan against the guest's blkfront: attach, I/O, detach, and
    whether the guest is still alive. A guest that stopped answering is a
    finding, reported (with its console), not an exception."""
    disk = guest.attach_disk(size, backend="python", faults=plan)
    io = run_io(guest, disk.device, wait)
    detached = disk.detach()
    alive = guest.exec("echo alive", timeout=30).stdout.strip() == "alive"
    console = guest.console(200)
    trouble = [line for line in console.splitlines() if GUEST_TROUBLE.search(line)]
    result = {"plan": plan, "vdev": disk.vdev, "io": io, "backend": detached["report"],
              "xenstore_left": detached["xenstore_left"], "guest_alive": alive, "guest_trouble": trouble}
    result["outcome"] = outcome(result)
    return result


def outcome(result: dict) -> str:
    """What the frontend did, in a few words, from what was observed."""
    io, log = result["io"], "\n".join(result["io"]["kernel_log"])
    if not result["guest_alive"] or result["guest_trouble"]:
        return "guest crashed or hung: " + "; ".join(result["guest_trouble"][:2])
    if BLKFRONT_DISABLED in log:
        why = next((line.split("] ", 1)[-1] for line in io["kernel_log"] if ": " in line and "disabled" not in line
                    and ("response" in line or "illegal" in line)), "")
        return f"device disabled ({why.strip()}); I/O in flight stays pending" if why else "device disabled"
    if io["finished"] and io["write_ok"] and io["read_ok"] and io["same"]:
        return "works, data intact"
    if result["backend"].get("ended") == "frontend-closed":
        return "device closed; I/O failed, no hang" if io["finished"] else "device closed; I/O hangs"
    if io["finished"] and ("I/O error" in log or "Input/output error" in io["out"]):
        return "just the hit I/Os fail with EIO, the disk stays usable"
    return "I/O did not finish" if not io["finished"] else "data differs"


# -- the mirror: a hostile frontend against dom0's kernel blkback ------------------------
# The stock module kept off at boot (GuestSpec.no_stock), so that a frontend
# of ours drives the guest's disks instead of blkfront.
NO_BLKFRONT = ("xen-blkfront",)


def attack_blkback(guest: Guest, disk, attacks: str = "", timeout: float = 180) -> dict:
    """Run the hostile frontend (agent/hostile.py) in `guest` (a python-root
    guest created with no_stock=NO_BLKFRONT) against `disk` (attached with
    own_frontend=True, kernel backend); per attack what blkback answered,
    and what dom0's kernel logged meanwhile."""
    from xenlab.guest.agentrun import guest_run

    guests = guest._guests
    ssh = guests.ssh()
    before = int(ssh.check("dmesg | wc -l").strip())
    args = f"hostile run --devid {disk.info['devid']}" + (f" --attacks {attacks}" if attacks else "")
    result = guest_run(guests, guest.name, args, timeout=timeout)
    result["dom0_log"] = [line for line in ssh.check("dmesg").splitlines()[before:] if "blkback" in line or "blkif" in line.lower()
                          or "bogus" in line]
    return result
