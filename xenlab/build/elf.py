"""Just enough ELF64 reading for what users bring: section contents (a
module's .modinfo) and notes (a kernel's Xen PV notes, a GNU build id)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from xenlab.errors import ConfigError

# Header layouts by ELF class (1: 32-bit, as Xen's own image; 2: 64-bit), little endian.
EHDR = {1: struct.Struct("<16sHHIIIIIHHHHHH"), 2: struct.Struct("<16sHHIQQQIHHHHHH")}
SHDR = {1: struct.Struct("<IIIIIIIIII"), 2: struct.Struct("<IIQQQQIIQQ")}
PHDR = {1: struct.Struct("<IIIIIIII"), 2: struct.Struct("<IIQQQQQQ")}
NHDR = struct.Struct("<III")
PT_NOTE, SHT_NOTE = 4, 7
NT_GNU_BUILD_ID = 3


@dataclass(frozen=True)
class Note:
    name: str
    type: int
    desc: bytes


def is_elf(data: bytes) -> bool:
    return data[:4] == b"\x7fELF" and data[4:5] in (b"\1", b"\2") and data[5:6] == b"\1" and len(data) >= EHDR[data[4]].size


def is_elf64(data: bytes) -> bool:
    return is_elf(data) and data[4] == 2


def _header(data: bytes, what: str):
    if not is_elf(data):
        raise ConfigError(f"{what} is not a little-endian ELF file")
    return data[4], EHDR[data[4]].unpack_from(data)


def sections(data: bytes, what: str = "the file") -> dict[str, bytes]:
    """{section name: contents} (NOBITS sections are empty)."""
    cls, h = _header(data, what)
    shoff, shentsize, shnum, shstrndx = h[6], h[11], h[12], h[13]
    headers = [SHDR[cls].unpack_from(data, shoff + i * shentsize) for i in range(shnum)]
    if not headers or shstrndx >= len(headers):
        return {}
    strtab = headers[shstrndx]
    names = data[strtab[4]: strtab[4] + strtab[5]]
    out = {}
    for sh in headers:
        name = names[sh[0]: names.index(b"\0", sh[0])].decode(errors="replace")
        out[name] = b"" if sh[1] == 8 else data[sh[4]: sh[4] + sh[5]]  # 8: SHT_NOBITS
    return out


def _parse_notes(blob: bytes) -> list[Note]:
    notes, off = [], 0
    while off + NHDR.size <= len(blob):
        namesz, descsz, ntype = NHDR.unpack_from(blob, off)
        off += NHDR.size
        name = blob[off: off + namesz].rstrip(b"\0").decode(errors="replace")
        off += (namesz + 3) & ~3
        notes.append(Note(name, ntype, blob[off: off + descsz]))
        off += (descsz + 3) & ~3
    return notes


def notes(data: bytes, what: str = "the file") -> list[Note]:
    """Every note, from PT_NOTE segments (or SHT_NOTE sections when there are no program headers)."""
    cls, h = _header(data, what)
    phoff, phentsize, phnum = h[5], h[9], h[10]
    found: list[Note] = []
    for i in range(phnum):
        ph = PHDR[cls].unpack_from(data, phoff + i * phentsize)
        if ph[0] == PT_NOTE:
            # p_offset and p_filesz sit at different places in the two classes.
            offset, size = (ph[1], ph[4]) if cls == 1 else (ph[2], ph[5])
            found += _parse_notes(data[offset: offset + size])
    if not phnum:
        shoff, shentsize, shnum = h[6], h[11], h[12]
        for i in range(shnum):
            sh = SHDR[cls].unpack_from(data, shoff + i * shentsize)
            if sh[1] == SHT_NOTE:
                found += _parse_notes(data[sh[4]: sh[4] + sh[5]])
    return found


def build_id(data: bytes, what: str = "the file") -> str | None:
    """The GNU build id as hex (what `xl info` reports for Xen as build_id), or None."""
    return next((n.desc.hex() for n in notes(data, what) if n.name == "GNU" and n.type == NT_GNU_BUILD_ID), None)


def modinfo_entries(data: bytes, what: str = "the module") -> list[tuple[str, str]]:
    """A kernel module's .modinfo as (key, value) pairs, in order (a key such as alias repeats)."""
    info = sections(data, what).get(".modinfo")
    if info is None:
        raise ConfigError(f"{what} has no .modinfo section: not a Linux kernel module (.ko)")
    out = []
    for entry in info.split(b"\0"):
        key, sep, value = entry.decode(errors="replace").partition("=")
        if sep:
            out.append((key, value))
    return out


def modinfo(data: bytes, what: str = "the module") -> dict[str, str]:
    """A kernel module's .modinfo as {key: value} (vermagic, license, depends, ...; a repeated key's first value)."""
    out: dict[str, str] = {}
    for key, value in modinfo_entries(data, what):
        out.setdefault(key, value)
    return out
