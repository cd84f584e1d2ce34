"""Progress of the long build steps read from their output: mmdebstrap's
packages, kbuild's compiled files, and the dom0 image being written."""

import io
import shutil
import time

import pytest
from rich.console import Console

from xenlab.build import dom0
from xenlab.progress import LineCount, Steps

# Shapes of real `mmdebstrap --verbose` output (bookworm), shortened.
MMDEBSTRAP = """\
I: chroot architecture amd64 is equal to the host's architecture
I: running apt-get update...
Get:1 http://deb.debian.org/debian bookworm InRelease [151 kB]
Get:2 http://deb.debian.org/debian bookworm/main amd64 Packages [8790 kB]
Fetched 9422 kB in 2s (4967 kB/s)
I: downloading packages with apt...
The following NEW packages will be installed:
  base-files libc6 dpkg
0 upgraded, 3 newly installed, 0 to remove and 0 not upgraded.
Get:1 http://deb.debian.org/debian bookworm/main amd64 base-files amd64 12.4+deb12u15 [70.9 kB]
Get:2 http://deb.debian.org/debian bookworm/main amd64 libc6 amd64 2.36-9+deb12u14 [2759 kB]
Get:3 http://deb.debian.org/debian bookworm/main amd64 dpkg amd64 1.21.23 [1568 kB]
I: extracting archives...
I: installing essential packages...
Selecting previously unselected package base-files.
Preparing to unpack .../base-files_12.4+deb12u15_amd64.deb ...
Unpacking base-files (12.4+deb12u15) ...
Unpacking libc6:amd64 (2.36-9+deb12u14) ...
Unpacking dpkg (1.21.23) ...
Setting up base-files (12.4+deb12u15) ...
Setting up libc6:amd64 (2.36-9+deb12u14) ...
Setting up dpkg (1.21.23) ...
I: /vmlinuz is now a symlink to boot/vmlinuz-6.1.0-57-amd64
I: installing remaining packages inside the chroot...
0 upgraded, 2 newly installed, 0 to remove and 0 not upgraded.
Get:1 http://deb.debian.org/debian bookworm/main amd64 kmod amd64 30+20221128-1 [94.7 kB]
Get:2 http://deb.debian.org/debian bookworm/main amd64 busybox amd64 1:1.35.0-4+b3 [452 kB]
Unpacking kmod (30+20221128-1) ...
Unpacking busybox (1:1.35.0-4+b3) ...
Setting up kmod (30+20221128-1) ...
Setting up busybox (1:1.35.0-4+b3) ...
I: cleaning package lists and apt cache...
"""


def log_steps() -> tuple[Steps, io.StringIO]:
    out = io.StringIO()
    return Steps(out=Console(file=out, force_terminal=False, width=120, color_system=None)), out


def test_mmdebstrap_counts_packages_of_the_totals_apt_states():
    steps, _ = log_steps()
    packages = dom0.PackageProgress(steps)
    for line in MMDEBSTRAP.splitlines():
        packages.feed(line)
    # apt-get update's two index downloads are not packages.
    assert packages.counts == {"downloading": 5, "unpacking": 5, "configuring": 5}
    assert packages.total == 5
    assert (packages.phase, packages.said) == ("", "cleaning package lists and apt cache...")


def test_mmdebstrap_phases_as_shown():
    steps, out = log_steps()
    packages = dom0.PackageProgress(steps)
    shown = []
    steps.status = lambda text: shown.append(text)
    steps.progress = lambda done, total=None, detail="", unit="": shown.append((detail, done, total, unit))
    for line in MMDEBSTRAP.splitlines():
        packages(line)
    # mmdebstrap's steps, not its other notes nor a maintainer script's "I: /vmlinuz is now a symlink".
    assert shown[:2] == ["running apt-get update...", "downloading packages with apt..."]
    assert not any("symlink" in str(s) or "chroot architecture" in str(s) for s in shown)
    assert ("downloading:", 1, 3, "packages downloaded") in shown
    assert ("unpacking:", 3, 3, "packages unpacked") in shown
    # The second apt run raises the total: 3 of 5 set up, not 3 of 3.
    assert ("unpacking:", 4, 5, "packages unpacked") in shown
    assert ("configuring:", 5, 5, "packages set up") in shown
    assert shown[-1] == "cleaning package lists and apt cache..."


def test_mmdebstrap_in_a_log_shows_its_steps_and_package_counts():
    steps, out = log_steps()
    with steps.step("mmdebstrap"):
        packages = dom0.PackageProgress(steps)
        for line in MMDEBSTRAP.splitlines():
            packages(line)
    text = out.getvalue()
    assert "    installing essential packages...\n" in text
    # Fed within one second: the throttle keeps the count lines out, the steps in.
    assert "packages set up" not in text and "    cleaning package lists and apt cache...\n" in text


def test_kbuild_compile_lines_are_the_count():
    steps, _ = log_steps()
    compiled = LineCount(steps, r"^\s+CC\s", 860, "compiled", "files")
    kbuild = ["  SYNC    include/config/auto.conf.cmd", "  HOSTCC  scripts/basic/fixdep", "  CC      scripts/mod/empty.o",
              "  AS      arch/x86/entry/entry_64.o", "  CC      kernel/fork.o", "  AR      kernel/built-in.a",
              "  LD      vmlinux.o", "  CC      arch/x86/boot/compressed/misc.o", "kernel/fork.c:12: warning: CC this"]
    for line in kbuild:
        compiled(line)
    assert compiled.count == 3


def test_tree_bytes_is_the_space_files_take_not_what_links_point_to(tmp_path):
    big = tmp_path / "outside"
    big.write_bytes(b"z" * (4 << 20))
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a").write_bytes(b"x" * (1 << 20))
    (tree / "link").symlink_to(big)
    assert (1 << 20) <= dom0._tree_bytes(tree) < (1 << 20) + (64 << 10)


def test_watch_growth_reports_the_file_filling_up(tmp_path):
    image, seen = tmp_path / "rootfs.img", []
    steps, _ = log_steps()
    steps.progress = lambda done, total=None, detail="", unit="": seen.append((done, total, detail, unit))
    with dom0._watch_growth(image, 4, steps, "written to rootfs.img:", every_s=0.01):
        with open(image, "wb") as f:
            for _ in range(3):
                f.write(b"\1" * (1 << 20))
                f.flush()
                time.sleep(0.1)
    assert seen and all(total == 4 and unit == "MiB" for _, total, _, unit in seen)
    assert max(done for done, *_ in seen) >= 2


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs e2fsprogs")
def test_mkfs_says_what_it_writes_and_how_big(tmp_path):
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "big").write_bytes(b"\1" * (3 << 20))
    steps, out = log_steps()
    with steps.step("mkfs.ext4 -d (16M)"):
        dom0._mkfs(rootfs, tmp_path / "rootfs.img", 16, tmp_path / "build.log", steps)
    assert "    writing 3 MiB of files into rootfs.img (16 MiB ext4)\n" in out.getvalue()
    assert (tmp_path / "rootfs.img").stat().st_size == 16 << 20


def test_kernel_build_counts_compiles_against_a_dry_run_total(tmp_path, monkeypatch):
    from subprocess import CompletedProcess

    from xenlab.build import kernel

    tree = tmp_path / "linux"
    (tree / "arch/x86/boot/compressed").mkdir(parents=True)
    for name in ("main.c", "compressed/misc.c"):  # built after vmlinux: counted by their C files
        (tree / "arch/x86/boot" / name).write_text("")
    dry_run = b"".join(b"set -e; echo '  CC      f%d.o'; gcc -c f%d.c\n" % (i, i) for i in range(60))
    build = [f"  CC      f{i}.o" for i in range(60)] + ["  LD      vmlinux", "  CC      arch/x86/boot/main.o"]

    def fake_run(argv, *, on_line=None, **_):
        argv = [str(a) for a in argv]
        if argv[-2:] == ["-n", "bzImage"]:  # (nice -n 10 make ... -n bzImage)
            return CompletedProcess(argv, 2, dry_run, b"")
        if "bzImage" in argv:
            for line in build:
                on_line(line)
        return CompletedProcess(argv, 0, b"", b"")

    monkeypatch.setattr(kernel, "run", fake_run)
    steps, out = log_steps()
    with steps.step("minimal guest kernel"):
        assert kernel._compile(tree, tmp_path / "out", tmp_path / "build.log", steps) == 61
    assert "    compiled 61/62 files (98%)\n" in out.getvalue()
