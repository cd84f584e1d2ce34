"""gdb on the lab VM: QEMU's gdbstub (started on demand through libvirt, on a
loopback port of the lab's own) and the symbols that exist.

QEMU answers gdb's qAttached with 1, so quitting gdb detaches and the lab
runs on; while gdb holds the VM stopped, Xen and dom0 are frozen (their
clocks jump when it goes on)."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from xenlab.build import symbols
from xenlab.build.elf import sections as elf_sections
from xenlab.dom0 import Dom0
from xenlab.errors import LabError

XEN_SYMBOLS = "/proc/xen/xensyms"  # Xen's own table, read by dom0 through XENPF_get_symbol
DOM0_SYMBOLS = "/proc/kallsyms"
GDB = "gdb"


@dataclass
class GdbSession:
    """What `xenlab debug gdb` runs: argv (gdb and its options), the stub's
    port, the symbol files loaded and notes on what is missing."""

    argv: list[str]
    port: int
    symbol_files: dict[str, str] = field(default_factory=dict)  # what -> path
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"argv": self.argv, "port": self.port, "symbol_files": self.symbol_files, "notes": self.notes}


def gdb_binary() -> str:
    found = shutil.which(GDB)
    if not found:
        raise LabError("gdb is not installed on this host", "install Debian's gdb: `apt-get install gdb` (ci/setup-host.sh does)")
    return found


def _listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port, read from /proc/net/tcp:
    connecting would count as gdb attaching, and the stub stops the VM then."""
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    wanted = f"0100007F:{port:04X}"
    return any(fields[1] == wanted and fields[3] == "0A" for fields in (line.split() for line in lines))


def ensure_stub(lab) -> int:
    """The port of the lab VM's gdbstub on 127.0.0.1, started when it is not
    (a restored or rebooted VM has none); the port is remembered per VM."""
    from xenlab.lab.state import free_port

    info = lab.require_up()
    state_file = lab.dir / "gdbstub.json"
    try:
        known = json.loads(state_file.read_text())
    except (OSError, ValueError):
        known = {}
    # QEMU starts one stub per run (a second `gdbserver` fails): the record
    # holds while the same VM runs.
    if known.get("qemu_pid") == info.get("qemu_pid") and known.get("port"):
        return known["port"]
    port = free_port()
    reply = lab.monitor(f"gdbserver tcp:127.0.0.1:{port}").strip()
    if not _listening(port):
        raise LabError(f"QEMU did not start its gdbstub on 127.0.0.1:{port}: {reply or 'no reply'}",
                       f"QEMU runs one gdbstub per VM; `xenlab down --lab {lab.name}` and `up` give a fresh one")
    state_file.write_text(json.dumps({"port": port, "qemu_pid": info.get("qemu_pid")}))
    return port


def _cached_elf(lab, dom0, what: str, remote: str) -> Path | None:
    """An ELF of the symbols dom0 lists in `remote`, kept while the content is the same."""
    result = dom0.run(f"cat {remote}", timeout=300)
    if not result.ok or not result.stdout.strip():
        return None
    digest = hashlib.sha256(result.stdout.encode()).hexdigest()[:16]
    path = lab.dir / "debug" / f"{what}-{digest}.elf"
    if not path.exists():
        parsed = symbols.parse_map(result.stdout)
        if not parsed:
            return None
        symbols.symbol_elf(parsed, path)
    return path


def symbol_files(lab, dom0) -> tuple[dict[str, str], list[str]]:
    """The symbol files for gdb and notes on what is missing: Xen's (the user's
    xen-syms beside their Xen, else Xen's table read in dom0) and dom0's
    kernel (the user's vmlinux when it has symbols, else /proc/kallsyms)."""
    files: dict[str, str] = {}
    notes: list[str] = []
    own_xen = Path(lab.cfg.xen) if lab.cfg.xen else None
    xen_syms = own_xen.parent / "xen-syms" if own_xen else None
    if xen_syms and xen_syms.is_file():
        files["xen"] = str(xen_syms)
    else:
        elf = _cached_elf(lab, dom0, "xen-symbols", XEN_SYMBOLS)
        if elf:
            files["xen"] = str(elf)
            notes.append(f"Xen: symbols only (from dom0's {XEN_SYMBOLS}); for types and lines boot your own Xen "
                         "(`up --xen`) with xen-syms beside it")
        else:
            notes.append(f"Xen: no symbols (no xen-syms beside [lab] xen, and dom0's {XEN_SYMBOLS} is not readable)")
    own_kernel = Path(lab.cfg.dom0.kernel) if lab.cfg.dom0.kernel else None
    if own_kernel and own_kernel.is_file() and _has_symbols(own_kernel):
        files["dom0"] = str(own_kernel)
    else:
        elf = _cached_elf(lab, dom0, "dom0-symbols", DOM0_SYMBOLS)
        if elf:
            files["dom0"] = str(elf)
            notes.append(f"dom0 kernel: symbols only (from {DOM0_SYMBOLS}); Debian ships its vmlinux stripped")
        else:
            notes.append(f"dom0 kernel: no symbols ({DOM0_SYMBOLS} not readable)")
    return files, notes


def _has_symbols(elf: Path) -> bool:
    return ".symtab" in elf_sections(elf.read_bytes(), str(elf))


def session(lab, gdb_args: list[str]) -> GdbSession:
    """Start (or reuse) the stub and build gdb's command line: symbols, then
    `target remote`, then the user's own arguments (so `-batch -ex ...` runs
    against the attached VM)."""
    binary = gdb_binary()
    port = ensure_stub(lab)
    with Dom0(lab) as dom0:
        files, notes = symbol_files(lab, dom0)
    argv = [binary, "-q", "-ex", "set pagination off", "-ex", "set confirm off"]
    for path in files.values():
        argv += ["-ex", f"add-symbol-file {path}"]
    argv += ["-ex", f"target remote 127.0.0.1:{port}", *gdb_args]
    return GdbSession(argv, port, files, notes)
