"""Cores of guests (`xl dump-core`): fetched from dom0 with the kernel they
ran and its System.map, and the kernel's log read back out of one.

An `xl dump-core` file is an ELF whose sections hold the guest's pages
(.xen_pages) and, in the same order, their frame numbers (.xen_p2m for a PV
guest: pfn/gmfn pairs; .xen_pfn for an auto-translated one: pfns). A 64-bit
PV Linux maps its image at __START_KERNEL_map + pseudo-physical address, so
a symbol of the image (the printk buffer, __log_buf) is found by its pfn."""

from __future__ import annotations

import io
import re
import shlex
import shutil
import struct
import time
import zlib
from pathlib import Path

from xenlab.agent.facts import KERNEL_PANIC
from xenlab.build import symbols
from xenlab.errors import GuestError

START_KERNEL_MAP = 0xFFFFFFFF80000000
PAGE = 4096
LOG_BUFFER = "__log_buf"
CORE_FILE, KERNEL_FILE, MAP_FILE = "core", "vmlinux", "System.map"
# A lab's own cores/ folder keeps this many cores, the newest: each is the
# guest's whole memory, and a CI run that crashes guests on purpose makes many.
CORES_KEPT = 5
_PRINTABLE = re.compile(rb"[\x20-\x7e\t]{3,}")


class CoreFile:
    """A dump-core ELF: its sections and the guest pages by pfn."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.sections = self._read_sections()
        if ".xen_pages" not in self.sections:
            raise ValueError(f"{self.path} is not an `xl dump-core` file (no .xen_pages section)")
        self._page_index = self._read_pfns()

    def _read_sections(self) -> dict[str, tuple[int, int]]:
        with open(self.path, "rb") as f:
            header = f.read(64)
            if header[:4] != b"\x7fELF" or header[4] != 2:
                raise ValueError(f"{self.path} is not a 64-bit ELF file")
            shoff, = struct.unpack_from("<Q", header, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from("<HHH", header, 0x3A)
            f.seek(shoff)
            table = f.read(shentsize * shnum)
            entries = [struct.unpack_from("<IIQQQQ", table, i * shentsize) for i in range(shnum)]
            names_at, names_size = entries[shstrndx][4], entries[shstrndx][5]
            f.seek(names_at)
            names = f.read(names_size)
        out = {}
        for name_off, _kind, _flags, _addr, offset, size in entries:
            name = names[name_off:names.index(b"\0", name_off)].decode()
            out[name] = (offset, size)
        return out

    def _section(self, name: str) -> bytes:
        offset, size = self.sections[name]
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def _read_pfns(self) -> dict[int, int]:
        if ".xen_p2m" in self.sections:
            raw = self._section(".xen_p2m")
            pfns = [struct.unpack_from("<Q", raw, i)[0] for i in range(0, len(raw), 16)]
        elif ".xen_pfn" in self.sections:
            raw = self._section(".xen_pfn")
            pfns = [struct.unpack_from("<Q", raw, i)[0] for i in range(0, len(raw), 8)]
        else:
            raise ValueError(f"{self.path} has neither .xen_p2m nor .xen_pfn")
        return {pfn: index for index, pfn in enumerate(pfns)}

    @property
    def pages(self) -> int:
        return len(self._page_index)

    def read_kernel(self, vaddr: int, size: int) -> bytes:
        """Bytes of the kernel image's mapping (zeros where a page is not in the core)."""
        base = self.sections[".xen_pages"][0]
        out = bytearray()
        with open(self.path, "rb") as f:
            address = vaddr
            while address < vaddr + size:
                pfn, within = divmod(address - START_KERNEL_MAP, PAGE)
                take = min(PAGE - within, vaddr + size - address)
                index = self._page_index.get(pfn)
                if index is None:
                    out += bytes(take)
                else:
                    f.seek(base + index * PAGE + within)
                    out += f.read(take)
                address += take
        return bytes(out)


def text_runs(blob: bytes) -> list[str]:
    """Printable runs: what is left to read when the ring's index is not known."""
    return [m.group(0).decode("ascii", "replace").rstrip() for m in _PRINTABLE.finditer(blob)]


# Linux 6.x printk ring (kernel/printk/printk_ringbuffer.h): descriptors
# {state_var; text_blk_lpos {begin, next}} and infos {seq, ts_nsec, text_len,
# facility, flags/level, caller_id, dev_info[64]}, one each per record; the
# text lives in __log_buf as blocks of {unsigned long id; char text[]}.
DESCS, INFOS = "_printk_rb_static_descs", "_printk_rb_static_infos"
DESC_SIZE, INFO_SIZE = 24, 88
DESC_COMMITTED, DESC_FINALIZED = 1, 2


def _extent(table: list, name: str) -> tuple[int, int] | None:
    at = next((i for i, s in enumerate(table) if s.name == name), None)
    if at is None:
        return None
    following = next((s.address for s in table[at + 1:] if s.address > table[at].address), None)
    return (table[at].address, following - table[at].address) if following else None


def printk_records(core: CoreFile, table: list) -> list[str] | None:
    """The log as dmesg prints it ("[   1.234567] text"), in sequence order,
    or None when the map lacks the ring's symbols."""
    names = (LOG_BUFFER, DESCS, INFOS)
    extents = [e for e in (_extent(table, name) for name in names) if e is not None]
    if len(extents) < len(names):
        return None
    (text_at, text_room), (descs_at, descs_room), (infos_at, infos_room) = extents
    ring_size = 1 << (text_room.bit_length() - 1)  # a power of two; the symbol gap may hold padding
    count = min(descs_room // DESC_SIZE, infos_room // INFO_SIZE)
    text = core.read_kernel(text_at, ring_size)
    descs = core.read_kernel(descs_at, count * DESC_SIZE)
    infos = core.read_kernel(infos_at, count * INFO_SIZE)
    records = []
    for i in range(count):
        state_var, begin, following = struct.unpack_from("<QQQ", descs, i * DESC_SIZE)
        seq, ts_nsec, text_len = struct.unpack_from("<QQH", infos, i * INFO_SIZE)
        if (state_var >> 62) not in (DESC_COMMITTED, DESC_FINALIZED) or begin == following or following - begin > ring_size:
            continue
        block = begin & (ring_size - 1)
        if (begin // ring_size) != ((following - 1) // ring_size):
            block = 0  # a block that would wrap is placed at the ring's start
        raw = text[block + 8:block + 8 + text_len]
        records.append((seq, ts_nsec, raw.decode("utf-8", "replace")))
    records.sort()
    return [f"[{ts // 1_000_000_000:5d}.{ts % 1_000_000_000 // 1000:06d}] {line}"
            for _seq, ts, body in records for line in body.split("\n")]


def kernel_log(core_path: Path, system_map: Path | None) -> list[str]:
    """The guest kernel's log read out of its core: the printk ring's records
    when the System.map names it, else printable text around a panic message."""
    core = CoreFile(core_path)
    if system_map and Path(system_map).is_file():
        records = printk_records(core, symbols.parse_map(Path(system_map).read_text()))
        if records is not None:
            return records
    raw = Path(core_path).read_bytes()
    at = raw.find(KERNEL_PANIC.encode())
    if at < 0:
        return []
    return text_runs(raw[max(0, at - 16384):at + 4096])


def panic_report(lines: list[str]) -> list[str]:
    """The last crash in a kernel log: from what set it off (an oops, a BUG,
    a sysrq crash, or the panic line itself) to the end of the log, which
    holds the panic message and the call trace printed after it."""
    starts = [i for i, line in enumerate(lines) if _CRASH_START.search(line)]
    if not starts:
        return []
    # An oops comes a few dozen lines before the panic it ends in: start there.
    near = [i for i in starts if starts[-1] - CRASH_LINES <= i]
    return lines[near[0]:]


CRASH_LINES = 80  # an oops report is shorter than this
_CRASH_START = re.compile(r"(BUG: |Oops|sysrq: Trigger a crash|general protection fault|" + re.escape(KERNEL_PANIC) + ")")


class _Gunzip:
    """A file-like sink that un-gzips into `path` as the bytes arrive."""

    def __init__(self, path: Path):
        self.file = open(path, "wb")
        self.inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def write(self, data: bytes) -> None:
        self.file.write(self.inflate.decompress(data))

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.write(self.inflate.flush())
        self.file.close()


def _copy_gzipped(ssh, remote: str, local: Path) -> None:
    """A file of dom0's, gzipped on the way (a guest core is mostly zero pages:
    128 MiB travel as ~5 MiB, where SFTP took a minute and a half under TCG)."""
    sink, errors = _Gunzip(local), io.BytesIO()
    try:
        status = ssh.stream(f"gzip -1 -c {shlex.quote(remote)}", None, sink, errors)
    finally:
        sink.close()
    if status != 0:
        local.unlink(missing_ok=True)
        raise GuestError(f"copying {remote} from dom0 failed: {errors.getvalue().decode(errors='replace').strip()}",
                         "is there space on this host? see `xenlab ssh -- ls -la " + str(Path(remote).parent) + "`")


def prune(folder: Path, keep: int = CORES_KEPT) -> list[str]:
    """Remove all but the `keep` newest core folders (those `fetch` made) in
    `folder`; the names of those removed."""
    if not folder.is_dir():
        return []
    cores = sorted((d for d in folder.iterdir() if d.is_dir() and (d / CORE_FILE).exists()),
                   key=lambda d: d.stat().st_mtime, reverse=True)
    removed = []
    for old in cores[keep:]:
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old.name)
    return removed


def fetch(ssh, taken: dict, dest: Path) -> Path:
    """Copy a core dom0 took (domctl's dump reply) into `dest`/NAME-TIME/ with
    the kernel and System.map the guest ran, and remove it from dom0."""
    folder = dest / f"{taken['name']}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        _copy_gzipped(ssh, taken["core"], folder / CORE_FILE)
        for remote, local in ((taken.get("kernel_file"), KERNEL_FILE), (taken.get("symbol_map"), MAP_FILE)):
            if remote:
                _copy_gzipped(ssh, remote, folder / local)
    finally:
        ssh.run(f"rm -f {shlex.quote(taken['core'])}")
    return folder
