"""Symbol tables for debuggers when no ELF with symbols exists: Debian's
Xen and dom0 kernel ship stripped, but dom0 can list both (Xen's through
/proc/xen/xensyms, the kernel's through /proc/kallsyms), and every kernel
build leaves a System.map. `symbol_elf` turns such a listing into a small
ELF file that gdb loads with `add-symbol-file` (no code, only names)."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

from xenlab.agent.sysutil import atomic_write

# "ffffffff81000000 T _stext" (System.map, kallsyms) or with " [module]" (kallsyms)
_LINE = re.compile(r"^([0-9a-fA-F]{8,16})\s+([a-zA-Z])\s+(\S+)")
KERNEL_SPACE = 0xFFFF800000000000  # below: per-cpu offsets and other non-addresses
MAX_SYMBOL_SIZE = 1 << 20  # a symbol's size is the gap to the next, at most this

EM_X86_64 = 62
SHT_PROGBITS, SHT_SYMTAB, SHT_STRTAB, SHT_NOBITS = 1, 2, 3, 8
SHF_ALLOC, SHF_EXECINSTR = 0x2, 0x4
STB_GLOBAL, STT_OBJECT, STT_FUNC = 1, 1, 2


@dataclass(frozen=True)
class Symbol:
    address: int
    kind: str  # nm's letter: T/t text, D/d data, B/b bss, R/r read-only...
    name: str


def parse_map(text: str) -> list[Symbol]:
    """The symbols of a System.map / kallsyms / xensyms listing, in address order
    (lines that are not symbols, and addresses outside kernel space, skipped)."""
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m and int(m.group(1), 16) >= KERNEL_SPACE:
            out.append(Symbol(int(m.group(1), 16), m.group(2), m.group(3)))
    return sorted(out, key=lambda s: s.address)


def lookup(symbols: list[Symbol], address: int) -> str | None:
    """'name+0x1a' for an address, from a listing sorted by address."""
    lo, hi = 0, len(symbols)
    while lo < hi:
        mid = (lo + hi) // 2
        if symbols[mid].address <= address:
            lo = mid + 1
        else:
            hi = mid
    if lo == 0:
        return None
    sym = symbols[lo - 1]
    offset = address - sym.address
    return None if offset >= MAX_SYMBOL_SIZE else (sym.name if offset == 0 else f"{sym.name}+{offset:#x}")


def symbol_elf(symbols: list[Symbol], path: Path) -> Path:
    """Write an x86-64 ELF holding only `symbols` (one NOBITS section spanning
    them, so gdb finds a symbol by address and `info symbol` works)."""
    if not symbols:
        raise ValueError("no symbols to write")
    start, end = symbols[0].address, symbols[-1].address + 1
    strtab = bytearray(b"\0")
    entries = [bytes(24)]  # the null symbol
    for i, sym in enumerate(symbols):
        following = symbols[i + 1].address if i + 1 < len(symbols) else sym.address + 1
        size = min(max(following - sym.address, 1), MAX_SYMBOL_SIZE)
        kind = STT_FUNC if sym.kind in "Tt" else STT_OBJECT
        name_at = len(strtab)
        strtab += sym.name.encode() + b"\0"
        # st_name, st_info, st_other, st_shndx (1: the section below), st_value, st_size
        entries.append(struct.pack("<IBBHQQ", name_at, (STB_GLOBAL << 4) | kind, 0, 1, sym.address, size))
    shstrtab = b"\0.text\0.symtab\0.strtab\0.shstrtab\0"
    symtab = b"".join(entries)
    header_size = 64
    symtab_at = header_size
    strtab_at = symtab_at + len(symtab)
    shstrtab_at = strtab_at + len(strtab)
    sections_at = (shstrtab_at + len(shstrtab) + 7) & ~7

    def section(name: int, kind: int, flags: int, addr: int, offset: int, size: int, link: int = 0, info: int = 0,
                align: int = 1, entsize: int = 0) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name, kind, flags, addr, offset, size, link, info, align, entsize)

    sections = b"".join([
        bytes(64),
        section(1, SHT_NOBITS, SHF_ALLOC | SHF_EXECINSTR, start, sections_at, end - start, align=16),
        section(7, SHT_SYMTAB, 0, 0, symtab_at, len(symtab), link=3, info=1, align=8, entsize=24),
        section(15, SHT_STRTAB, 0, 0, strtab_at, len(strtab)),
        section(23, SHT_STRTAB, 0, 0, shstrtab_at, len(shstrtab)),
    ])
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, little-endian, version 1
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, EM_X86_64, 1, start, 0, sections_at, 0, header_size, 0, 0, 64, 5, 4)
    blob = header + symtab + bytes(strtab) + shstrtab
    blob += bytes(sections_at - len(blob)) + sections
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, blob)
    return path
