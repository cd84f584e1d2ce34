"""What users bring (kernels, modules, a Xen, files to copy), checked on the
host before anything starts: the ELF reading, the refusals and their words,
the extra guest root, and scp-style endpoints. Small synthetic ELF files
stand in for real kernels; the e2e tests use real ones."""

from __future__ import annotations

import gzip
import struct
import subprocess

import pytest

from xenlab.build import boot, elf, extras
from xenlab.errors import ConfigError
from xenlab.transfer import Endpoint, parse


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name) + 1, len(desc), ntype) + pad(name + b"\0") + pad(desc)


def make_elf(cls: int, notes: bytes, payload: bytes = b"") -> bytes:
    """An ELF (class 1 or 2) with one PT_NOTE segment and `payload` after it."""
    ehdr, phdr = elf.EHDR[cls], elf.PHDR[cls]
    ident = b"\x7fELF" + bytes([cls, 1, 1]) + b"\0" * 9
    off = ehdr.size + phdr.size
    if cls == 2:
        head = ehdr.pack(ident, 2, 62, 1, 0, ehdr.size, 0, 0, ehdr.size, phdr.size, 1, 0, 0, 0)
        ph = phdr.pack(elf.PT_NOTE, 4, off, 0, 0, len(notes), len(notes), 4)
    else:
        head = ehdr.pack(ident, 2, 3, 1, 0, ehdr.size, 0, 0, ehdr.size, phdr.size, 1, 0, 0, 0)
        ph = phdr.pack(elf.PT_NOTE, off, 0, 0, len(notes), len(notes), 4, 4)
    return head + ph + notes + payload


BUILD_ID = bytes(range(20))


@pytest.mark.parametrize("cls", [1, 2])
def test_notes_and_build_id_in_both_elf_classes(cls):
    data = make_elf(cls, note(b"GNU", elf.NT_GNU_BUILD_ID, BUILD_ID) + note(b"Xen", 1, b"\1\2\3\4"))
    assert [n.name for n in elf.notes(data)] == ["GNU", "Xen"]
    assert elf.build_id(data) == BUILD_ID.hex()
    assert elf.build_id(make_elf(cls, note(b"Xen", 1, b"x"))) is None


def test_modinfo_from_a_compiled_object(tmp_path):
    src = tmp_path / "m.c"
    src.write_text('const char m[] __attribute__((section(".modinfo"), used)) = "vermagic=6.1.99 SMP mod_unload \\0license=GPL";\n')
    subprocess.run(["cc", "-c", str(src), "-o", str(tmp_path / "m.ko")], check=True)
    assert elf.modinfo((tmp_path / "m.ko").read_bytes()) == {"vermagic": "6.1.99 SMP mod_unload ", "license": "GPL"}
    subprocess.run(["cc", "-c", "-x", "c", "/dev/null", "-o", str(tmp_path / "plain.o")], check=True)
    with pytest.raises(ConfigError, match="not a Linux kernel module"):
        elf.modinfo((tmp_path / "plain.o").read_bytes(), "plain.o")
    with pytest.raises(ConfigError, match="not a little-endian ELF"):
        elf.modinfo(b"hello", "hello")


def kernel_elf(release: str = "6.1.99-mine", xen: bool = True) -> bytes:
    return make_elf(2, note(b"Xen", 1, b"\0" * 8) if xen else note(b"GNU", 3, BUILD_ID), f"Linux version {release} (me@host) #1".encode())


def test_read_kernel_accepts_a_pv_vmlinux_and_names_what_is_wrong(tmp_path):
    good = tmp_path / "vmlinux"
    good.write_bytes(kernel_elf())
    kernel = extras.read_kernel(good)
    assert (kernel.kind, kernel.release) == ("ELF vmlinux", "6.1.99-mine")
    cases = {
        "text": (b"just text\n", "is not a Linux kernel"),
        "noversion": (make_elf(2, note(b"Xen", 1, b"x")), "without a 'Linux version' string"),
        "nopv": (kernel_elf(xen=False), "no Xen ELF notes"),
    }
    for name, (data, words) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError, match=words) as err:
            extras.read_kernel(tmp_path / name)
        assert str(tmp_path / name) in err.value.message
    with pytest.raises(ConfigError, match="no such file"):
        extras.read_kernel(tmp_path / "missing", option="--dom0-kernel")
    assert "CONFIG_XEN_PV=y" in extras.PV_OPTIONS


def test_bzimage_release_from_the_setup_header():
    header = bytearray(0x400)
    header[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", header, 0x20E, 0x100)
    header[0x300:0x320] = b"6.1.192 (root@x) #1 SMP\0".ljust(32, b"\0")
    assert extras.bzimage_release(bytes(header)) == "6.1.192"
    assert extras.bzimage_release(b"\0" * 0x400) is None


def compiled_module(tmp_path, name: str, release: str):
    src = tmp_path / f"{name}.c"
    src.write_text(f'const char m[] __attribute__((section(".modinfo"), used)) = "vermagic={release} SMP mod_unload ";\n')
    subprocess.run(["cc", "-c", str(src), "-o", str(tmp_path / f"{name}.ko")], check=True)
    src.unlink()
    return tmp_path / f"{name}.ko"


def test_modules_found_checked_and_listed(tmp_path):
    mods = tmp_path / "mods"
    (mods / "lib/modules/6.1.99/extra").mkdir(parents=True)
    compiled_module(mods / "lib/modules/6.1.99/extra", "my-drv", "6.1.99")
    found = extras.find_modules(mods)
    assert list(found) == ["my_drv"]
    extras.check_modules(found, "6.1.99")
    with pytest.raises(ConfigError, match=r"built for kernel 6\.1\.99 \(vermagic '6\.1\.99 SMP mod_unload '\), but the guest kernel is 6\.1\.1"):
        extras.check_modules(found, "6.1.1")
    assert extras.load_list(("my-drv count=3", "my_drv.ko"), found) == ["my_drv count=3", "my_drv"]
    with pytest.raises(ConfigError, match="no other.ko among the modules given"):
        extras.load_list(("other",), found)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no .ko files"):
        extras.find_modules(tmp_path / "empty")
    with pytest.raises(ConfigError, match="no such directory"):
        extras.find_modules(tmp_path / "nope")


def test_overlay_holds_modules_load_list_and_files_with_modes(tmp_path):
    ko = compiled_module(tmp_path, "drv", "6.1.99")
    tool = tmp_path / "tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o751)
    blob = extras.overlay({"drv": ko}, ["drv count=1"], [extras.parse_add(f"{tool}:/usr/bin/tool")])
    assert blob == extras.overlay({"drv": ko}, ["drv count=1"], [extras.parse_add(f"{tool}:/usr/bin/tool")])  # same input, same name
    listing = subprocess.run(["cpio", "-tv", "--quiet"], input=gzip.decompress(blob), capture_output=True, check=True).stdout.decode()
    assert "lib/modules/extra/drv.ko" in listing and "etc/xenlab/load" in listing
    assert any(line.startswith("-rwxr-x--x") and line.endswith("usr/bin/tool") for line in listing.splitlines())
    with pytest.raises(ConfigError, match="does not exist"):
        extras.parse_add(f"{tmp_path}/none:/x")


def test_xen_images_are_recognised_and_refused_with_reasons(tmp_path):
    multiboot = struct.pack("<III", boot.MULTIBOOT1_MAGIC, 0, (-boot.MULTIBOOT1_MAGIC) & 0xFFFFFFFF)
    xen = make_elf(1, note(b"GNU", 3, BUILD_ID)) + multiboot + b"Xen version %d.%d"
    (tmp_path / "xen.gz").write_bytes(gzip.compress(xen))
    assert boot.read_xen(tmp_path / "xen.gz") == xen and elf.build_id(xen) == BUILD_ID.hex()
    syms = make_elf(2, note(b"GNU", 3, BUILD_ID)) + b"Xen version"
    cases = {"syms": (syms, "looks like xen-syms"), "linux": (kernel_elf(), "not a Xen hypervisor image"),
             "broken.gz": (b"\x1f\x8b" + b"\0" * 20, "damaged gzip")}
    for name, (data, words) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError, match=words):
            boot.read_xen(tmp_path / name)


def test_dom0_modules_dir_must_match_the_kernel(tmp_path):
    (tmp_path / "lib/modules/6.1.99").mkdir(parents=True)
    (tmp_path / "lib/modules/6.1.99/modules.dep").write_text("")
    assert boot.modules_dir(str(tmp_path), "6.1.99") == tmp_path / "lib/modules/6.1.99"
    with pytest.raises(ConfigError, match=r"no modules for kernel 6\.2\.0 \(it has 6\.1\.99\)"):
        boot.modules_dir(str(tmp_path), "6.2.0")
    with pytest.raises(ConfigError, match="holds modules for kernel 6.1.99"):
        boot.modules_dir(str(tmp_path / "lib/modules/6.1.99"), "6.2.0")


def test_cp_endpoints():
    assert parse("dom0:/etc/hostname") == Endpoint("dom0", "/etc/hostname")
    assert parse("g1:/tmp/x") == Endpoint("g1", "/tmp/x")
    assert parse("./a:b") == Endpoint("host", "./a:b")  # a colon after a slash is part of a host path
    assert parse("/tmp/x") == Endpoint("host", "/tmp/x")
    with pytest.raises(ConfigError, match="invalid guest name"):
        parse("Bad:/x")
    with pytest.raises(ConfigError, match="names no path"):
        parse("dom0:")
