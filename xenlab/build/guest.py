"""Everything a guest boots from, built ahead (cached): the minimal kernel
and every guest root for each kernel."""

from __future__ import annotations

from typing import Any

from xenlab.agent.facts import KERNELS, ROOTS
from xenlab.build import dom0, kernel, rootfs
from xenlab.config import LabConfig
from xenlab.paths import cache_dir
from xenlab.progress import Steps


def build_all(cfg: LabConfig, steps: Steps, force: bool = False) -> dict:
    """Build (cached) the dom0 image, the minimal guest kernel and every
    guest root; what was built, where, and how big."""
    image = dom0.build(cfg, steps)
    with steps.step("minimal guest kernel (about 5 min on 2 cores when not cached)"):
        built = kernel.build_minimal(cache_dir() / "guest", force=force)
        kernel.minimal_vmlinux(built.bzimage)
    result: dict[str, Any] = {"kernel": str(built.bzimage), "kernel_build": built.to_dict(), "roots": {},
              # As `guest build --json` reported it before builds went out of tree.
              "kernel_manifest": {"recipe_id": built.bzimage.parent.name, "bzimage_bytes": built.bzimage.stat().st_size,
                                  "build_seconds": kernel.build_stamp(built).get("build_seconds")}}
    for root in ROOTS:
        for kern in KERNELS:
            with steps.step(f"guest root {root} for the {kern} kernel"):
                path = rootfs.build(image, root, kern, cache_dir() / "guest", kernel.stock_modules(built))
            result["roots"][f"{root}/{kern}"] = {"path": str(path), "bytes": path.stat().st_size}
    return result
