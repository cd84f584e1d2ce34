from xenlab.agent.xl import parse_xl_info, parse_xl_list
from xenlab.lab import serial


def test_serial_watch_progress_then_ready(tmp_path):
    log = tmp_path / "serial.log"
    log.write_text("(XEN) Xen version 4.17.7 (Debian)\n")
    watch = serial.SerialWatch(log)
    assert watch.poll() == (["Xen started"], None, False)
    with log.open("a") as f:
        f.write("[ 3.8] Run /init as init process\nxenlab-init: [5.1] filesystems mounted\nxenlab-init: [6.1] network up\nxenlab-init: [8.0] XENLAB-READY\n")
    new, crash, ready = watch.poll()
    assert new == ["dom0 initramfs", "dom0 init", "dom0 network", "dom0 ready"] and crash is None and ready


def test_serial_watch_spots_xen_panic(tmp_path):
    log = tmp_path / "serial.log"
    log.write_text("(XEN) d0v0 Unhandled: vec 14, #PF[0001]\n(XEN) ****************************************\n(XEN) Panic on CPU 0:\n")
    _, crash, ready = serial.SerialWatch(log).poll()
    assert crash == "(XEN) Panic on CPU 0:" and not ready


def test_serial_watch_spots_init_failure_and_partial_lines(tmp_path):
    log = tmp_path / "serial.log"
    log.write_text("XENLAB-PANIC: xenstored does not ans")
    watch = serial.SerialWatch(log)
    assert watch.poll()[1] == "XENLAB-PANIC: xenstored does not ans"
    assert "does not ans" in watch.tail()


def test_missing_log_is_not_an_error(tmp_path):
    assert serial.SerialWatch(tmp_path / "none").poll() == ([], None, False)


XL_LIST = """Name                                        ID   Mem VCPUs\tState\tTime(s)
Domain-0                                     0  1024     2     r-----      12.5
guest one                                    3   128     1     -b----       0.4
"""


def test_parse_xl_list():
    rows = parse_xl_list(XL_LIST)
    assert rows[0] == {"name": "Domain-0", "id": 0, "memory_mib": 1024, "vcpus": 2, "state": "r-----", "cpu_seconds": 12.5}
    assert rows[1]["name"] == "guest one" and rows[1]["id"] == 3


def test_parse_xl_info():
    info = parse_xl_info("xen_major              : 4\nxen_minor              : 17\nxen_extra              : .7\nxen_caps : xen-3.0-x86_64 hvm-3.0-x86_32\n")
    assert info["xen_major"] == "4" and info["xen_extra"] == ".7" and info["xen_caps"].startswith("xen-3.0")


def test_tail_lines_reads_back_from_the_end_in_blocks():
    import io

    from xenlab.lab.state import tail_lines

    f = io.BytesIO(b"".join(b"line %d\n" % n for n in range(5000)))
    assert tail_lines(f, 3, block=64) == [b"line 4997", b"line 4998", b"line 4999"]
    assert f.tell() == len(f.getvalue())  # left at the end, where following goes on
    assert tail_lines(io.BytesIO(b"no newline at the end"), 2) == [b"no newline at the end"]
    assert tail_lines(io.BytesIO(b""), 5) == [] and tail_lines(io.BytesIO(b"a\n"), 0) == []
