"""Ring I/O checks on the real frontends and backends, run in dom0:
`python3 -m xenlab_agent.iocheck GUEST` prints a JSON list of results.

Block: the guest writes random data through blkfront (O_DIRECT, several
offsets) and says its SHA-256; dom0 hashes the backing file there (a
mismatch is written again as a pattern naming its offsets, to say where).
dom0 writes a pattern into the backing file; the guest reads it through
blkfront and its SHA-256 must match. A read-only disk must refuse writes and stay unchanged.
Network: pings both ways and a bulk transfer each way over netfront/netback
whose SHA-256 must match on both ends."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

from . import blkattach, domctl, facts
from .errors import AgentError, report

RECORD = 32
BLOCK = 4096
DOM0_ADDR = facts.DOM0_BRIDGE_IP
BULK_BYTES = 4 << 20
# The same records in busybox awk (%d is 32-bit there, so the offset is %.0f).
# Its printf writes each call straight out: gathering a block's 128 records
# into one string first makes it 4x faster in a TCG guest.
AWK_PATTERN = ('BEGIN{for(i=0;i<n;i++){s=s sprintf("%-8s%016.0f%07d\\n", tag, off+i*32, i%10000000);'
               ' if(i%128==127){printf "%s", s; s=""}} printf "%s", s}')
# The largest request dd makes: 32 segments, what blkfront puts in one
# indirect request by default.
MAX_IO = 128 << 10


def pattern(tag: str, offset: int, length: int) -> bytes:
    """32-byte records naming their tag and absolute disk offset: never all
    zeros, and a misplaced block shows where it came from."""
    return b"".join(b"%-8s%016d%07d\n" % (tag.encode(), offset + i * RECORD, i % 10_000_000) for i in range(length // RECORD))


def awk_pattern_cmd(tag: str, offset: int, length: int) -> str:
    return f"awk -v tag={tag} -v off={offset} -v n={length // RECORD} '{AWK_PATTERN}'"


def chunks(size: int) -> list[tuple[int, int]]:
    """Several MB at the start, an odd place in the middle and the end."""
    piece = min(1 << 20, max(BLOCK, (size // 8) // BLOCK * BLOCK))
    middle = (size // 2 + 3 * BLOCK) // BLOCK * BLOCK
    return [(0, piece), (middle, 2 * piece if middle + 2 * piece <= size - piece else piece), (size - piece, piece)]


def io_size(offset: int, length: int) -> int:
    """dd's block size for a chunk: the largest power of two up to MAX_IO that
    divides both, so aligned chunks go as multi-segment requests and an
    odd place as single pages."""
    size = MAX_IO
    while size > BLOCK and (offset % size or length % size):
        size //= 2
    return size


def read_cmd(dev: str, offset: int, length: int) -> str:
    """dd reading one chunk through blkfront, around the page cache, to stdout."""
    bs = io_size(offset, length)
    return f"dd if={dev} bs={bs} skip={offset // bs} count={length // bs} iflag=direct"


def first_difference(a: bytes, b: bytes) -> int | None:
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


class Check:
    def __init__(self, name: str):
        self.name = name
        self.results: list[dict] = []

    def guest(self, script: str, timeout: float = 300) -> tuple[int, str, str]:
        r = domctl.exec_in(self.name, script, b"", timeout)
        return r["rc"], base64.b64decode(r["stdout"]).decode(errors="replace"), base64.b64decode(r["stderr"]).decode(errors="replace")

    def record(self, check: str, ok: bool, detail: str, started: float, **data) -> None:
        self.results.append({"check": check, "ok": bool(ok), "detail": detail, "seconds": round(time.monotonic() - started, 2), "data": data})

    # -- block -------------------------------------------------------------
    def block(self, disk: dict) -> None:
        dev, path, size = f"/dev/{disk['vdev']}", disk["path"], disk["size_mib"] << 20
        places = chunks(size)
        total = sum(n for _, n in places)
        started = time.monotonic()
        # Random data and its SHA-256 from the guest: the kernel makes it far
        # faster than awk makes a pattern under TCG (7 s for 4 MiB). Only a
        # mismatch writes the pattern again, to say where and what landed.
        script = " && ".join(
            f"dd if=/dev/urandom of=/tmp/blk bs={BLOCK} count={n // BLOCK} iflag=fullblock 2>/dev/null && sha256sum /tmp/blk && "
            f"dd if=/tmp/blk of={dev} bs={bs} seek={off // bs} oflag=direct conv=notrunc,fsync 2>/dev/null"
            for off, n in places for bs in [io_size(off, n)]
        ) + "; rc=$?; rm -f /tmp/blk; exit $rc"
        rc, out, err = self.guest(script)
        wrote = time.monotonic() - started
        sent = [line.split()[0] for line in out.splitlines() if line.strip()]
        bad = []
        if rc == 0:
            with open(path, "rb") as f:
                landed = [hashlib.sha256(os.pread(f.fileno(), n, off)).hexdigest() for off, n in places]
            wrong = [(off, n) for (off, n), want, got in zip(places, sent + [""] * len(places), landed, strict=False) if want != got]
            if wrong:
                bad = [self._where_writes_differ(dev, path, *wrong[0]), f"{len(wrong)} of {len(places)} places differ"]
        where = ", ".join(f"{n >> 10} KiB at {off}" for off, n in places)
        self.record(
            f"block {disk.get('label', disk['vdev'])}: guest writes, dom0 backing file matches", rc == 0 and not bad,
            f"{total >> 10} KiB ({where}) byte-exact in {path} (sha256 {' '.join(h[:16] for h in sent)})" if rc == 0 and not bad
            else (f"guest write failed: {err.strip()}" if rc else "; ".join(bad[:3])),
            started, bytes=total, write_mb_s=round(total / wrote / 1e6, 2),
        )

        started = time.monotonic()
        written = [pattern("dom0", off, n) for off, n in places]
        fd = os.open(path, os.O_WRONLY)
        try:
            for (off, _), data in zip(places, written, strict=True):
                os.pwrite(fd, data, off)
            os.fsync(fd)
        finally:
            os.close(fd)
        # The guest's page cache may hold the old blocks: flush it, then read
        # around it. The guest hashes what it read; only on a mismatch does it
        # make the pattern itself (slow under TCG) to say where.
        script = f"blockdev --flushbufs {dev} && " + " && ".join(
            f"{read_cmd(dev, off, n)} 2>/dev/null | sha256sum" for off, n in places
        )
        rc, out, err = self.guest(script)
        got = [line.split()[0] for line in out.splitlines() if line.strip()]
        want = [hashlib.sha256(data).hexdigest() for data in written]
        ok = rc == 0 and got == want
        if ok:
            detail = f"{total >> 10} KiB read back byte-exact through blkfront (sha256 {' '.join(h[:16] for h in got)})"
        elif rc:
            detail = f"guest read failed: {err.strip()[-300:]}"
        else:
            detail = self._where_reads_differ(dev, places, got, want)
        self.record(f"block {disk.get('label', disk['vdev'])}: dom0 writes backing file, guest reads it", ok, detail, started, bytes=total)

    def _where_writes_differ(self, dev: str, path: str, off: int, n: int) -> str:
        """A place whose bytes did not land: written again as records naming their offset, compared byte for byte."""
        bs = io_size(off, n)
        rc, _, err = self.guest(f"{awk_pattern_cmd('domU', off, n)} > /tmp/blk && dd if=/tmp/blk of={dev} bs={bs} seek={off // bs} "
                                "oflag=direct conv=notrunc,fsync 2>/dev/null; rc=$?; rm -f /tmp/blk; exit $rc")
        if rc:
            return f"at {off}: the guest's data did not land, and writing it again failed: {err.strip()[-200:]}"
        with open(path, "rb") as f:
            on_disk = os.pread(f.fileno(), n, off)
        d = first_difference(on_disk, pattern("domU", off, n))
        if d is None:
            return f"at {off}: the guest's data did not land the first time; written again as a pattern, it did"
        return f"offset {off + d}: got {on_disk[d:d + 32]!r}"

    def _where_reads_differ(self, dev: str, places: list[tuple[int, int]], got: list[str], want: list[str]) -> str:
        wrong = [(off, n) for (off, n), g, w in zip(places, got + [""] * len(places), want, strict=False) if g != w]
        off, n = wrong[0]
        _, out, err = self.guest(
            f"{read_cmd(dev, off, n)} > /tmp/got; "
            f"{awk_pattern_cmd('dom0', off, n)} > /tmp/want; cmp /tmp/want /tmp/got"
        )
        return f"mismatch in the guest at {len(wrong)} of {len(places)} places; first at {n >> 10} KiB from {off}: {(out + err).strip()[-300:]}"

    def readonly(self, disk: dict) -> None:
        dev, path = f"/dev/{disk['vdev']}", disk["path"]
        started = time.monotonic()
        before = _sha256_file(path)
        rc, out, err = self.guest(
            f"echo ro=$(blockdev --getro {dev}); dd if=/dev/urandom of={dev} bs={BLOCK} count=1 oflag=direct conv=fsync; echo dd=$?"
        )
        after = _sha256_file(path)
        refused = "dd=0" not in out and "ro=1" in out
        self.record(
            f"block {disk.get('label', disk['vdev'])}: read-only disk refuses writes", refused and before == after,
            f"guest sees ro=1, dd refused: {next((line for line in err.splitlines() if line.startswith('dd:')), err.strip()[-80:])}; "
            "backing file unchanged" if refused and before == after
            else f"write was not refused or file changed (guest: {out.strip()} {err.strip()}; file {'unchanged' if before == after else 'CHANGED'})",
            started,
        )

    # -- network -----------------------------------------------------------
    def network(self, ip: str) -> None:
        started = time.monotonic()
        rc, out, err = self.guest(f"ping -c 3 -W 3 {DOM0_ADDR}")
        back = subprocess.run(["busybox", "ping", "-c", "3", "-W", "3", ip], capture_output=True, text=True)
        self.record(
            "net: ping guest -> dom0 and dom0 -> guest", rc == 0 and back.returncode == 0,
            f"{_ping_summary(out)}; {_ping_summary(back.stdout)}" if rc == 0 and back.returncode == 0
            else f"guest: {(out + err).strip()[-200:]} dom0: {back.stdout.strip()[-200:]}",
            started,
        )

        # guest -> dom0: dom0 receives exactly BULK_BYTES and hashes them.
        started = time.monotonic()
        server = socket.create_server((DOM0_ADDR, 0))
        port = server.getsockname()[1]
        received: dict = {}
        thread = threading.Thread(target=_receive, args=(server, BULK_BYTES, received), daemon=True)
        thread.start()
        rc, out, err = self.guest(
            f"dd if=/dev/urandom of=/tmp/tx bs=65536 count={BULK_BYTES // 65536} 2>/dev/null && sha256sum /tmp/tx && nc {DOM0_ADDR} {port} < /tmp/tx", timeout=300
        )
        thread.join(timeout=60)
        server.close()
        sent = out.split()[0] if rc == 0 and out.split() else "?"
        ok = rc == 0 and received.get("sha256") == sent and received.get("bytes") == BULK_BYTES
        self.record(
            "net: bulk guest -> dom0", ok,
            f"{BULK_BYTES >> 20} MiB, sha256 {sent[:16]} on both ends, {received.get('mb_s')} MB/s" if ok
            else f"guest sha {sent[:16]} rc {rc} {err.strip()[-200:]}, dom0 got {received}",
            started, bytes=BULK_BYTES, mb_s=received.get("mb_s"),
        )

        # dom0 -> guest: the guest's nc runs a script that stores the stream.
        started = time.monotonic()
        port = 5901
        rc, out, err = self.guest(
            f"rm -f /tmp/rx /tmp/rx.done; printf '#!/bin/sh\\ncat > /tmp/rx; touch /tmp/rx.done\\n' > /tmp/rx.sh; chmod +x /tmp/rx.sh; "
            f"(nc -l -p {port} -e /tmp/rx.sh </dev/null >/dev/null 2>&1 &); sleep 0.3"
        )
        data = os.urandom(BULK_BYTES)
        want = hashlib.sha256(data).hexdigest()
        t0 = time.monotonic()
        try:
            with socket.create_connection((ip, port), timeout=30) as s:
                s.sendall(data)
            sent_ok = True
        except OSError as e:
            sent_ok, err = False, str(e)
        rc, out, err2 = self.guest("i=0; while [ ! -f /tmp/rx.done ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; sha256sum /tmp/rx; wc -c < /tmp/rx", timeout=120)
        took = time.monotonic() - t0
        got = out.split()[0] if out.split() else "?"
        ok = sent_ok and rc == 0 and got == want
        self.record(
            "net: bulk dom0 -> guest", ok,
            f"{BULK_BYTES >> 20} MiB, sha256 {want[:16]} on both ends, {BULK_BYTES / took / 1e6:.2f} MB/s" if ok
            else f"dom0 sha {want[:16]}, guest {out.strip()} {err} {err2}".strip(),
            started, bytes=BULK_BYTES, mb_s=round(BULK_BYTES / took / 1e6, 2),
        )


def _receive(server: socket.socket, expect: int, out: dict) -> None:
    server.settimeout(120)
    try:
        conn, _ = server.accept()
    except OSError as e:
        out["error"] = str(e)
        return
    digest, count, first = hashlib.sha256(), 0, None
    with conn:
        conn.settimeout(60)
        while count < expect:
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            first = first or time.monotonic()
            digest.update(chunk)
            count += len(chunk)
    took = time.monotonic() - (first or time.monotonic())
    out.update(sha256=digest.hexdigest(), bytes=count, mb_s=round(count / took / 1e6, 2) if took > 0 else None)


def _ping_summary(text: str) -> str:
    lines = [line for line in text.splitlines() if "packets transmitted" in line or "min/avg/max" in line]
    return " / ".join(line.strip() for line in lines) or text.strip()[-120:]


def _sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def run(name: str) -> list[dict]:
    meta = domctl.read_meta(name)
    if meta is None or domctl.domid_of(name) is None:
        raise domctl.Refused(f"no running guest named {name!r}", "see `xenlab guest list`")
    check = Check(name)
    rw = [d for d in meta["disks"] if not d["readonly"]]
    ro = [d for d in meta["disks"] if d["readonly"]]
    if rw:
        check.block(rw[0])
    if ro:
        check.readonly(ro[0])
    for disk in blkattach.list_attached(name):  # every disk attached later, whichever backend serves it
        label = {**disk, "label": f"{disk['vdev']} ({disk['backend']} backend)"}
        (check.readonly if disk["readonly"] else check.block)(label)
    if meta["net"]:
        check.network(meta["ip"])
    if not check.results:
        raise domctl.Refused(f"guest {name!r} has no disk and no network to check", "create it with --disk SIZE and/or --net")
    return check.results


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        json.dump(run(args[0]), sys.stdout)
    except AgentError as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
