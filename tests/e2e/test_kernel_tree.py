"""`xenlab guest build --kernel-tree DIR`: a Linux tree built out of tree and
cached by its content. The tree here is the one the minimal kernel is built
from (xenlab's own copy of Debian's linux-source), built with xenlab's
fragment alone (the frontends built in), so it is an entry of its own beside
the minimal kernel's, which it must leave alone. Unchanged, nothing is
rebuilt; one changed file is an incremental build; a file that does not
compile shows the compiler's error and leaves no usable build. The tree is
put back as it was, mtimes included, so the minimal kernel stays cached."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .conftest import lab_prerequisites, xenlab

pytestmark = [pytest.mark.full, pytest.mark.own_labs]  # builds kernels, no lab: under xdist, beside the session lab's tests

FILE = "drivers/xen/xenbus/xenbus_probe_frontend.c"


@pytest.fixture
def tree():
    lab_prerequisites()
    build_dir = Path(xenlab("guest", "kernel-dir").stdout.strip())
    tree = Path((build_dir / "source").resolve()) if (build_dir / "source").exists() else None
    assert tree and (tree / FILE).exists(), f"no source link in {build_dir}"
    original, stat = (tree / FILE).read_bytes(), (tree / FILE).stat()
    yield tree
    (tree / FILE).write_bytes(original)
    os.utime(tree / FILE, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the tree's digest (sizes, mtimes) as before


def build(tree: Path, check: bool = True):
    return xenlab("guest", "build", "--kernel-tree", str(tree), "--json", check=check)


def test_unchanged_tree_is_not_rebuilt_and_one_file_is_incremental(tree):
    minimal = Path(xenlab("guest", "kernel-dir").stdout.strip())
    minimal_image = minimal.parent / "bzImage"
    minimal_mtime = minimal_image.stat().st_mtime_ns
    first = json.loads(build(tree).stdout)  # built once on a new cache (~5 min), cached from then on
    assert Path(first["build_dir"]) != minimal and Path(first["bzimage"]).exists()
    again = json.loads(build(tree).stdout)
    assert again["compiled"] == 0 and again["bzimage"] == first["bzimage"]
    with open(tree / FILE, "a") as f:
        f.write("/* touched by xenlab's e2e test */\n")
    changed = json.loads(build(tree).stdout)
    assert 1 <= changed["compiled"] <= 10, changed  # that file (and the kernel's version stamp), not the ~900 of a full build
    assert Path(changed["bzimage"]).stat().st_mtime > Path(first["bzimage"]).stat().st_mtime - 1
    assert minimal_image.stat().st_mtime_ns == minimal_mtime and minimal_image.exists()  # the minimal kernel untouched


def test_a_tree_that_does_not_build_shows_the_compiler_error(tree):
    with open(tree / FILE, "a") as f:
        f.write("#error xenlab e2e: this tree does not build\n")
    entry = Path((tree / "../../kernels").resolve())  # the cache's kernel entries, beside the source
    stamps_before = {p.parent for p in entry.glob("*/stamp.json")}
    failed = build(tree, check=False)
    assert failed.returncode != 0 and "this tree does not build" in failed.stderr
    # The failed build's entry (this tree's) lost its stamp: it is not taken as built.
    assert len(stamps_before - {p.parent for p in entry.glob("*/stamp.json")}) == 1


def test_refusals(tmp_path):
    lab_prerequisites()
    notree = xenlab("guest", "build", "--kernel-tree", str(tmp_path), check=False)
    assert notree.returncode == 2 and "is not a Linux source tree" in notree.stderr
    nofrag = xenlab("guest", "kernel-dir", "--config", str(tmp_path / "x.config"), check=False)
    assert nofrag.returncode == 1 and "--config goes with --kernel-tree" in nofrag.stderr
