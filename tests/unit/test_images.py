import pytest

from xenlab import config
from xenlab.build import dom0 as images
from xenlab.build import initramfs, kernel
from xenlab.errors import HostError

DEP = """kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko: kernel/drivers/virtio/virtio.ko
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/jbd2/jbd2.ko
kernel/lib/crc16.ko:
kernel/fs/jbd2/jbd2.ko:
kernel/crypto/crc32c_generic.ko:
"""


def test_module_order_puts_dependencies_first():
    order = [p.split("/")[-1] for p in initramfs.module_order(DEP, ("virtio_pci", "crc32c_generic", "ext4"))]
    assert order.index("virtio_ring.ko") < order.index("virtio.ko") < order.index("virtio_pci_legacy_dev.ko") < order.index("virtio_pci.ko")
    assert order.index("crc16.ko") < order.index("ext4.ko") and order.index("jbd2.ko") < order.index("ext4.ko")
    assert len(order) == len(set(order)) == 8


def test_module_order_unknown_module():
    with pytest.raises(HostError, match="nvme not found"):
        initramfs.module_order(DEP, ("nvme",))


def test_recipe_id_changes_with_recipe():
    base = config.load()
    assert images.recipe_id(base) == images.recipe_id(config.load())
    more = config.load(overrides={"dom0.extra_packages": ["strace"]})
    bigger = config.load(overrides={"dom0.disk_size": "3G"})
    assert len({images.recipe_id(base), images.recipe_id(more), images.recipe_id(bigger)}) == 3
    # The lab's own settings do not change the image.
    assert images.recipe_id(config.load(overrides={"memory": "4G", "name": "x"})) == images.recipe_id(base)


def _bzimage(payload: bytes) -> bytes:
    import struct

    header = bytearray(3 * 512)
    header[0x1F1] = 2  # setup sectors: protected-mode code starts at 3*512
    struct.pack_into("<II", header, 0x248, 16, len(payload))
    return bytes(header) + b"\0" * 16 + payload + b"trailer"


def test_decompress_bzimage_xz_and_gzip():
    import gzip
    import lzma

    elf = b"\x7fELF" + bytes(range(256)) * 64
    assert kernel.decompress_bzimage(_bzimage(lzma.compress(elf, format=lzma.FORMAT_XZ) + b"\x10\x00\x00\x00")) == elf
    assert kernel.decompress_bzimage(_bzimage(gzip.compress(elf))) == elf


def test_decompress_bzimage_zstd():
    """trixie's kernel: a zstd frame followed by the decompressed size (4 bytes)."""
    import struct
    import subprocess

    elf = b"\x7fELF" + bytes(range(256)) * 64
    frame = subprocess.run(["zstd", "-q", "-c"], input=elf, capture_output=True, check=True).stdout
    assert kernel.decompress_bzimage(_bzimage(frame + struct.pack("<I", len(elf)))) == elf


def test_decompress_bzimage_rejects_unknown_payload():
    with pytest.raises(HostError, match="unsupported kernel compression"):
        kernel.decompress_bzimage(_bzimage(b"\x02\x21\x4c\x18" + b"\0" * 32))  # lz4


def test_a_damaged_cached_image_is_removed_not_booted(tmp_path, monkeypatch):
    import json
    import os

    monkeypatch.setenv("XENLAB_CACHE", str(tmp_path))
    cfg = config.load()
    path = images.images_dir() / images.recipe_id(cfg)
    path.mkdir(parents=True)
    for name in images.VERIFIED:
        (path / name).write_bytes(name.encode() * 100)
    (path / "manifest.json").write_text(json.dumps({"files": images.file_hashes(path)}))
    assert images.find(cfg) is not None and (path / "verified.json").exists()  # intact: checked once, remembered
    (path / "initramfs.cpio").write_bytes(b"x" * len(b"initramfs.cpio" * 100))  # same size, other bytes
    os.utime(path / "initramfs.cpio", ns=(1, 1))
    assert "initramfs.cpio does not match" in images.verify(images.Dom0Image(path))
    assert images.find(cfg) is None and not path.exists()  # removed: the next build makes it anew
    path.mkdir()
    (path / "manifest.json").write_text(json.dumps({"files": {"rootfs.img": {"size": 5, "sha256": "0"}}}))
    assert images.verify(images.Dom0Image(path)) == "rootfs.img is missing"
