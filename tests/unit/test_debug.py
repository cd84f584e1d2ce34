"""The debug tools' own logic: symbol files (loaded by the host's real gdb),
Xen's debug key output, xenctx output and dump-core files."""

import struct
import subprocess

import pytest

from xenlab.build import symbols
from xenlab.debug import keys, stack
from xenlab.guest import coredump

SYSTEM_MAP = """\
0000000000000000 D __per_cpu_start
ffffffff81000000 T _stext
ffffffff81000000 T startup_64
ffffffff81001000 T xen_hypercall_sched_op
ffffffff81001020 t xen_safe_halt
ffffffff81002000 D some_data
ffffffff81003000 B __log_buf
ffffffff81004000 B after_log_buf
"""


def test_map_parsing_skips_non_addresses_and_looks_up():
    table = symbols.parse_map(SYSTEM_MAP)
    assert [s.name for s in table][:2] == ["_stext", "startup_64"] and all(s.address >= symbols.KERNEL_SPACE for s in table)
    assert symbols.lookup(table, 0xFFFFFFFF81001024) == "xen_safe_halt+0x4"
    assert symbols.lookup(table, 0xFFFFFFFF81001000) == "xen_hypercall_sched_op"
    assert symbols.lookup(table, 0xFFFFFFFF80000000) is None


def test_symbol_elf_is_read_by_gdb(tmp_path):
    elf = symbols.symbol_elf(symbols.parse_map(SYSTEM_MAP), tmp_path / "k.elf")
    out = subprocess.run(["gdb", "-q", "-batch", "-ex", f"add-symbol-file {elf}", "-ex", "info symbol 0xffffffff81001024",
                          "-ex", "p/x &xen_safe_halt"], capture_output=True, text=True, timeout=60).stdout
    assert "xen_safe_halt + 4 in section .text" in out and "0xffffffff81001020" in out


XEN_H = """\
(XEN) 'h' pressed -> showing installed handlers
(XEN)  key '%' (ascii '25') => trap to xendbg
(XEN)  key 'e' (ascii '65') => dump evtchn info
(XEN)  key 'q' (ascii '71') => dump domain (and guest debug) info
"""
XEN_E = """\
(XEN) some earlier line
(XEN) 'e' pressed -> dumping event-channel info
(XEN) 'e' pressed -> dumping event-channel info
(XEN) Event channel information for domain 0:
(XEN) Polling vCPUs: {}
(XEN)     port [p/m/s]
(XEN)        1 [0/0/1]: s=5 n=0 x=0 v=0
(XEN)        7 [1/0/  -   ]: s=3 n=1 x=0 d=1 p=3
(XEN) Event channel information for domain 1:
(XEN) Polling vCPUs: {}
(XEN)     port [p/m/s]
(XEN)        3 [0/1/1]: s=3 n=0 x=0 d=0 p=7
"""


def test_debug_key_output_is_cut_at_the_last_press_and_parsed():
    assert keys.parse_handlers(XEN_H) == {"%": "trap to xendbg", "e": "dump evtchn info", "q": "dump domain (and guest debug) info"}
    lines, complete = keys.after_press(XEN_E, "e")
    assert complete and lines[0].startswith("'e' pressed") and lines.count("'e' pressed -> dumping event-channel info") == 1
    parsed = keys.parse_evtchn(lines)["domains"]
    assert parsed["0"][1] == {"port": 7, "pending": 1, "masked": 0, "s": 3, "n": 1, "x": 0, "d": 1, "p": 3, "state": "interdomain"}
    assert parsed["0"][0]["state"] == "virq" and parsed["1"] == [
        {"port": 3, "pending": 0, "masked": 1, "s": 3, "n": 0, "x": 0, "d": 0, "p": 7, "state": "interdomain"}]
    _, complete = keys.after_press("(XEN) nothing of it\n", "e")
    assert not complete


XENCTX = """\
vcpu0:
rip: ffffffff812907b5 xen_hypercall_pv+0x5
flags: 00001246 i z p
rsp: ffffffff81a03e18
Stack:
 ffff888007a20480 000000000001e000 ffffffff81017866 ffffffff81a03e40

Stack Trace:
                  * [<ffffffff812907b5>] xen_hypercall_pv+0x5 <--
ffffffff81a03e18:     ffff888007a20480
ffffffff81a03e28:   [<ffffffff81017866>] xen_safe_halt+0x15
ffffffff81a03e30:     ffffffff81a03e40
vcpu1:
rip: ffffffff812907b5 xen_hypercall_pv+0x5

Stack Trace:
                  * [<ffffffff812907b5>] xen_hypercall_pv+0x5 <--
"""


def test_xenctx_output_is_split_per_vcpu():
    vcpus = stack.parse_xenctx(XENCTX)
    assert [v.vcpu for v in vcpus] == [0, 1]
    assert vcpus[0].rip_symbol == "xen_hypercall_pv+0x5"
    assert [f["symbol"] for f in vcpus[0].frames] == ["xen_hypercall_pv+0x5", "xen_safe_halt+0x15"]
    assert stack.parse_xenctx(XENCTX.split("vcpu1:")[0].replace("vcpu0:\n", ""), first_vcpu=3)[0].vcpu == 3


def _fake_core(path, pages: dict[int, bytes]) -> None:
    """A dump-core ELF of the layout xl writes: .xen_p2m (pfn, gmfn pairs) and .xen_pages in that order."""
    pfns = sorted(pages)
    p2m = b"".join(struct.pack("<QQ", pfn, 1000 + pfn) for pfn in pfns)
    data = b"".join(pages[pfn].ljust(coredump.PAGE, b"\0") for pfn in pfns)
    names = b"\0.xen_p2m\0.xen_pages\0.shstrtab\0"
    p2m_at = 64
    pages_at = (p2m_at + len(p2m) + coredump.PAGE - 1) // coredump.PAGE * coredump.PAGE
    names_at = pages_at + len(data)
    sh_at = names_at + len(names)

    def sh(name, offset, size):
        return struct.pack("<IIQQQQIIQQ", name, 1, 0, 0, offset, size, 0, 0, 1, 0)

    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8) + struct.pack(
        "<HHIQQQIHHHHHH", 4, 62, 1, 0, 0, sh_at, 0, 64, 0, 0, 64, 4, 3)
    blob = bytearray(header.ljust(p2m_at, b"\0") + p2m)
    blob = blob.ljust(pages_at, b"\0") + data + names
    blob += bytes(64) + sh(1, p2m_at, len(p2m)) + sh(10, pages_at, len(data)) + sh(21, names_at, len(names))
    path.write_bytes(bytes(blob))


RING_MAP = """\
ffffffff81a25120 d _printk_rb_static_infos
ffffffff81a25120 d _printk_rb_static_infos
ffffffff81a25400 d _printk_rb_static_descs
ffffffff81a25500 d log_buf_len
ffffffff81a26000 b __log_buf
ffffffff81a27008 b clear_seq
"""


def _ring_pages(records: list[tuple[int, str]]) -> dict[int, bytes]:
    """The three printk ring arrays laid out as the map above says, records
    written out of order (seq tells the order) and with stale bytes after each
    text, as a reused ring has."""
    infos, descs, text = bytearray(0x2E0), bytearray(0x100), bytearray(0x1000)
    at = 0
    for slot, (seq, body) in enumerate(records):
        raw = body.encode()
        text[at:at + 8 + len(raw) + 4] = struct.pack("<Q", seq) + raw + b"JUNK"
        struct.pack_into("<QQQ", descs, slot * 24, coredump.DESC_FINALIZED << 62, at, at + 8 + len(raw) + 4)
        struct.pack_into("<QQH", infos, slot * 88, seq, seq * 1_500_000, len(raw))
        at += (8 + len(raw) + 4 + 7) // 8 * 8
    base = 0xFFFFFFFF81A25000
    image = bytearray(0x2000)
    image[0x120:0x120 + len(infos)] = infos
    image[0x400:0x400 + len(descs)] = descs
    image[0x1000:0x2000] = text
    first = (base - coredump.START_KERNEL_MAP) // coredump.PAGE
    return {first: bytes(image[:0x1000]), first + 1: bytes(image[0x1000:])}


def test_kernel_log_is_read_from_the_printk_ring_in_seq_order(tmp_path):
    records = [(3, "Call Trace:"), (1, "sysrq: Trigger a crash"), (4, " sysrq_handle_crash+0x10/0x10"),
               (2, "Kernel panic - not syncing: sysrq triggered crash")]
    _fake_core(tmp_path / "core", {7: b"elsewhere: Kernel panic - not syncing: decoy", **_ring_pages(records)})
    (tmp_path / "System.map").write_text(RING_MAP)
    lines = coredump.kernel_log(tmp_path / "core", tmp_path / "System.map")
    assert lines == ["[    0.001500] sysrq: Trigger a crash", "[    0.003000] Kernel panic - not syncing: sysrq triggered crash",
                     "[    0.004500] Call Trace:", "[    0.006000]  sysrq_handle_crash+0x10/0x10"]
    assert coredump.panic_report(["[0] boot", *lines]) == lines
    # Without a System.map: printable text around a panic message anywhere in the core.
    assert any("decoy" in line for line in coredump.kernel_log(tmp_path / "core", None))


def test_a_file_that_is_not_a_core_is_refused(tmp_path):
    (tmp_path / "x").write_bytes(b"not an elf at all" * 10)
    with pytest.raises(ValueError, match="not a 64-bit ELF"):
        coredump.CoreFile(tmp_path / "x")


def test_trace_classes_make_xentrace_masks_and_unknown_ones_are_refused():
    from xenlab.debug import xentrace
    from xenlab.errors import LabError

    assert xentrace.event_mask(["evtchn"]) == 0x0020F000 | 0x0002F000 == xentrace.event_mask(["pv", "sched"])
    assert xentrace.event_mask(["all"]) == 0xFFFFF000
    with pytest.raises(LabError, match="unknown trace event class 'irq'") as e:
        xentrace.event_mask(["sched", "irq"])
    assert "evtchn" in e.value.hint
    assert xentrace.parse_counts("3 vcpu_block\n12 hypercall:event_channel_op\nnoise\n") == {
        "hypercall:event_channel_op": 12, "vcpu_block": 3}


def test_keys_that_take_the_lab_down_need_force():
    from xenlab.errors import LabError

    with pytest.raises(LabError, match="'R' reboots the machine") as e:
        keys.press(object(), "eR")  # refused before the lab is touched
    assert "--force" in e.value.hint


def test_a_labs_cores_folder_keeps_the_newest_cores_only(tmp_path):
    import os

    for i in range(coredump.CORES_KEPT + 2):
        folder = tmp_path / f"g{i}-20261205-10000{i}"
        folder.mkdir()
        (folder / coredump.CORE_FILE).write_bytes(b"x")
        os.utime(folder, (1000 + i, 1000 + i))
    (tmp_path / "notes").mkdir()  # not a core folder: left alone
    removed = coredump.prune(tmp_path)
    assert sorted(removed) == ["g0-20261205-100000", "g1-20261205-100001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["notes"] + [f"g{i}-20261205-10000{i}" for i in range(2, coredump.CORES_KEPT + 2)])
    assert coredump.prune(tmp_path / "absent") == []
