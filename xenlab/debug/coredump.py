"""Cores of guests (`xl dump-core`): fetched from dom0 with the kernel they
ran and its System.map, and the kernel's log read back out of one.

An `xl dump-core` file is an ELF whose sections hold the guest's pages
(.xen_pages) and, in the same order, their frame numbers (.xen_p2m for a PV
guest: pfn/gmfn pairs; .xen_pfn for an auto-translated one: pfns). A 64-bit
PV Linux maps its image at __START_KERNEL_map + pseudo-physical address, so
a symbol of the image (the printk buffer, __log_buf) is found by its pfn."""

from __future__ import annotations

import re
import struct
import time
from pathlib import Path

from xenlab.debug import symbols

START_KERNEL_MAP = 0xFFFFFFFF80000000
PAGE = 4096
LOG_BUFFER = "__log_buf"
CORE_FILE, KERNEL_FILE, MAP_FILE = "core", "vmlinux", "System.map"
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
    """Printable runs: the printk ring stores each record's text after an 8-byte id."""
    return [m.group(0).decode("ascii", "replace").rstrip() for m in _PRINTABLE.finditer(blob)]


def kernel_log(core_path: Path, system_map: Path | None) -> list[str]:
    """The guest kernel's log messages found in its core: from __log_buf when
    the System.map names it, else from around a panic message anywhere."""
    core = CoreFile(core_path)
    if system_map and Path(system_map).is_file():
        table = symbols.parse_map(Path(system_map).read_text())
        start = next((s for s in table if s.name == LOG_BUFFER), None)
        if start is not None:
            following = next((s.address for s in table if s.address > start.address), start.address + (1 << 17))
            return text_runs(core.read_kernel(start.address, following - start.address))
    raw = Path(core_path).read_bytes()
    at = raw.find(b"Kernel panic - not syncing")
    if at < 0:
        return []
    return text_runs(raw[max(0, at - 16384):at + 4096])


def panic_report(lines: list[str]) -> list[str]:
    """From a kernel log: the lines of the last oops/panic (the call trace and the panic line)."""
    starts = [i for i, line in enumerate(lines) if re.search(r"(BUG:|Oops|Call Trace:|sysrq: Trigger a crash|Kernel panic)", line)]
    if not starts:
        return []
    first = starts[0]
    for i in starts:
        if "Call Trace" in lines[i] or "sysrq" in lines[i] or "BUG:" in lines[i] or "Oops" in lines[i]:
            first = i
            break
    ends = [i for i, line in enumerate(lines) if "Kernel panic - not syncing" in line]
    last = ends[-1] if ends else len(lines) - 1
    return lines[max(0, first - 2):last + 3]


def fetch(ssh, taken: dict, dest: Path) -> Path:
    """Copy a core dom0 took (domctl's dump reply) into `dest`/NAME-TIME/ with
    the kernel and System.map the guest ran, and remove it from dom0."""
    folder = dest / f"{taken['name']}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        (folder / CORE_FILE).write_bytes(ssh.get(taken["core"]))
        for remote, local in ((taken.get("kernel_file"), KERNEL_FILE), (taken.get("symbol_map"), MAP_FILE)):
            if remote:
                (folder / local).write_bytes(ssh.get(remote))
    finally:
        ssh.run(f"rm -f {taken['core']}")
    return folder
