"""What Debian and kernel builds compress (xz, gzip, zstd), decompressed.

zstd goes through the zstd tool: the standard library has no zstd before
Python 3.14. Trailing bytes after the compressed stream are ignored: a
bzImage's payload ends with the decompressed size."""

from __future__ import annotations

import lzma
import shutil
import zlib

from xenlab.errors import HostError
from xenlab.run import run

MAGIC = {b"\xfd7zXZ\x00": "xz", b"\x1f\x8b": "gz", b"\x28\xb5\x2f\xfd": "zst"}
SUFFIX = {".xz": "xz", ".gz": "gz", ".zst": "zst"}


def kind_of(data: bytes) -> str | None:
    """"xz", "gz" or "zst" by the data's magic bytes; None for anything else."""
    return next((kind for magic, kind in MAGIC.items() if data.startswith(magic)), None)


def decompress(data: bytes, kind: str) -> bytes:
    if kind == "xz":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
    if kind == "gz":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
    if kind == "zst":
        if not shutil.which("zstd"):
            raise HostError("zstd is missing: this kernel's files are zstd-compressed", "apt-get install zstd (ci/setup-host.sh does)")
        return run(["zstd", "-dcq"], input=data).stdout
    raise ValueError(f"unknown compression {kind!r}")
