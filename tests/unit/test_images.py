import pytest

from xenlab import config
from xenlab.errors import HostError
from xenlab.orchestrate import images

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
    order = [p.split("/")[-1] for p in images.module_order(DEP, ("virtio_pci", "crc32c_generic", "ext4"))]
    assert order.index("virtio_ring.ko") < order.index("virtio.ko") < order.index("virtio_pci_legacy_dev.ko") < order.index("virtio_pci.ko")
    assert order.index("crc16.ko") < order.index("ext4.ko") and order.index("jbd2.ko") < order.index("ext4.ko")
    assert len(order) == len(set(order)) == 8


def test_module_order_unknown_module():
    with pytest.raises(HostError, match="nvme not found"):
        images.module_order(DEP, ("nvme",))


def test_recipe_id_changes_with_recipe():
    base = config.load()
    assert images.recipe_id(base) == images.recipe_id(config.load())
    more = config.load(overrides={"dom0.extra_packages": ["strace"]})
    bigger = config.load(overrides={"dom0.disk_size": "3G"})
    assert len({images.recipe_id(base), images.recipe_id(more), images.recipe_id(bigger)}) == 3
    # The lab's own settings do not change the image.
    assert images.recipe_id(config.load(overrides={"memory": "4G", "name": "x"})) == images.recipe_id(base)
