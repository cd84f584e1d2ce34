"""Grant pages from userspace: share with /dev/xen/gntalloc, map a peer's with
/dev/xen/gntdev (Linux uapi xen/gntalloc.h, xen/gntdev.h).

Both devices hand back an `index` that is the mmap offset of the pages. The
unmap notify asks the kernel to clear one byte and/or send an event when
this side's pages go away (process killed included): that is how the peer
learns we died."""

from __future__ import annotations

import fcntl
import mmap
import os
import struct

from .errors import AgentError, errno_name

PAGE = 4096
GNTALLOC = "/dev/xen/gntalloc"
GNTDEV = "/dev/xen/gntdev"


def _ioc(nr: int, size: int) -> int:
    # _IOC(_IOC_NONE, 'G', nr, size)
    return (size << 16) | (ord("G") << 8) | nr


# gntalloc: struct { u16 domid; u16 flags; u32 count; u64 index; u32 gref_ids[1]; } (24 bytes with padding)
ALLOC_GREF_FMT = "=HHIQI4x"
IOCTL_GNTALLOC_ALLOC_GREF = _ioc(5, struct.calcsize(ALLOC_GREF_FMT))
# struct { u64 index; u32 count; } padded to 16
DEALLOC_GREF_FMT = "=QI4x"
IOCTL_GNTALLOC_DEALLOC_GREF = _ioc(6, struct.calcsize(DEALLOC_GREF_FMT))
# struct { u64 index; u32 action; u32 event_channel_port; } (same layout in gntdev)
UNMAP_NOTIFY_FMT = "=QII"
IOCTL_GNTALLOC_SET_UNMAP_NOTIFY = _ioc(7, struct.calcsize(UNMAP_NOTIFY_FMT))
GNTALLOC_FLAG_WRITABLE = 1
UNMAP_NOTIFY_CLEAR_BYTE = 0x1
UNMAP_NOTIFY_SEND_EVENT = 0x2

# gntdev: struct { u32 count; u32 pad; u64 index; struct { u32 domid; u32 ref; } refs[1]; }
MAP_GRANT_REF_FMT = "=IIQ"
IOCTL_GNTDEV_MAP_GRANT_REF = _ioc(0, struct.calcsize(MAP_GRANT_REF_FMT) + 8)
# struct { u64 index; u32 count; u32 pad; }
UNMAP_GRANT_REF_FMT = "=QII"
IOCTL_GNTDEV_UNMAP_GRANT_REF = _ioc(1, struct.calcsize(UNMAP_GRANT_REF_FMT))
IOCTL_GNTDEV_SET_UNMAP_NOTIFY = _ioc(7, struct.calcsize(UNMAP_NOTIFY_FMT))


class GrantError(AgentError):
    pass


def pack_alloc_gref(domid: int, count: int, writable: bool = True) -> bytearray:
    """The ALLOC_GREF argument, with room for `count` gref ids (the kernel writes them all)."""
    head = struct.pack("=HHIQ", domid, GNTALLOC_FLAG_WRITABLE if writable else 0, count, 0)
    size = max(struct.calcsize(ALLOC_GREF_FMT), 16 + 4 * count)
    return bytearray(head + bytes(size - len(head)))


def unpack_alloc_gref(buf: bytes | bytearray, count: int) -> tuple[int, list[int]]:
    index = struct.unpack_from("=Q", buf, 8)[0]
    return index, list(struct.unpack_from(f"={count}I", buf, 16))


def pack_map_grant_ref(domid: int, refs: list[int]) -> bytearray:
    body = struct.pack(MAP_GRANT_REF_FMT, len(refs), 0, 0) + b"".join(struct.pack("=II", domid, r) for r in refs)
    return bytearray(body)


def _open(device: str) -> int:
    try:
        return os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise GrantError(f"cannot open {device}: {e.strerror}", "load xen-gntalloc / xen-gntdev and run as root", errno_=e.errno) from None


class SharedPages:
    """Pages this domain grants to `domid` (gntalloc). Closing revokes the
    grants; the kernel frees the pages once the peer has unmapped them."""

    def __init__(self, domid: int, count: int = 1, writable: bool = True):
        if count < 1:
            raise GrantError(f"cannot share {count} pages", "count must be at least 1")
        self.domid, self.count = domid, count
        self.fd = _open(GNTALLOC)
        arg = pack_alloc_gref(domid, count, writable)
        try:
            fcntl.ioctl(self.fd, IOCTL_GNTALLOC_ALLOC_GREF, arg)
        except OSError as e:
            os.close(self.fd)
            raise GrantError(
                f"gntalloc could not share {count} page(s) with domain {domid}: {e.strerror}",
                "the gntalloc limit (module parameter `limit`) or memory may be exhausted", errno_=e.errno,
            ) from None
        self.index, self.refs = unpack_alloc_gref(arg, count)
        try:
            self.map = mmap.mmap(self.fd, count * PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=self.index)
        except OSError as e:
            self._dealloc()
            os.close(self.fd)
            raise GrantError(f"mmap of shared pages failed: {e.strerror}", errno_=e.errno) from None

    def set_unmap_notify(self, offset: int | None = None, port: int | None = None) -> None:
        """When these pages go away: clear the byte at `offset` and/or send an event on `port`."""
        _set_unmap_notify(self.fd, IOCTL_GNTALLOC_SET_UNMAP_NOTIFY, self.index, offset, port)

    def _dealloc(self) -> None:
        try:
            fcntl.ioctl(self.fd, IOCTL_GNTALLOC_DEALLOC_GREF, bytearray(struct.pack(DEALLOC_GREF_FMT, self.index, self.count)))
        except OSError:
            pass  # release() of the file frees them anyway

    def close(self) -> None:
        if self.fd < 0:
            return
        self.map.close()
        self._dealloc()
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> SharedPages:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MappedPages:
    """A peer's grants mapped into this process (gntdev)."""

    def __init__(self, domid: int, refs: list[int], writable: bool = True):
        if not refs:
            raise GrantError("no grant references to map")
        self.domid, self.refs = domid, list(refs)
        self.fd = _open(GNTDEV)
        arg = pack_map_grant_ref(domid, self.refs)
        try:
            fcntl.ioctl(self.fd, IOCTL_GNTDEV_MAP_GRANT_REF, arg)
        except OSError as e:
            os.close(self.fd)
            raise GrantError(f"gntdev refused grant refs {self.refs[:8]} of domain {domid}: {e.strerror}", errno_=e.errno) from None
        self.index = struct.unpack_from("=Q", arg, 8)[0]
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            # The grant map hypercall happens here: a bad ref or domid fails this mmap.
            self.map = mmap.mmap(self.fd, len(self.refs) * PAGE, mmap.MAP_SHARED, prot, offset=self.index)
        except OSError as e:
            self._unmap_ref()
            os.close(self.fd)
            raise GrantError(
                f"cannot map grant ref(s) {self.refs[:8]} of domain {domid}: {errno_name(e.errno)} ({e.strerror})",
                "the domain must exist and have granted these refs to this domain (check the domid and the refs it published)",
                errno_=e.errno,
            ) from None

    def set_unmap_notify(self, offset: int | None = None, port: int | None = None) -> None:
        _set_unmap_notify(self.fd, IOCTL_GNTDEV_SET_UNMAP_NOTIFY, self.index, offset, port)

    def _unmap_ref(self) -> None:
        try:
            fcntl.ioctl(self.fd, IOCTL_GNTDEV_UNMAP_GRANT_REF, bytearray(struct.pack(UNMAP_GRANT_REF_FMT, self.index, len(self.refs), 0)))
        except OSError:
            pass

    def close(self) -> None:
        if self.fd < 0:
            return
        self.map.close()
        self._unmap_ref()
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> MappedPages:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class GrantMapper:
    """One gntdev handle for many mappings: a backend maps and unmaps a
    request's grants in one ioctl and one mmap each, without opening the
    device per request."""

    def __init__(self):
        self.fd = _open(GNTDEV)
        self.live = 0  # pages mapped now

    def map(self, domid: int, refs: list[int], writable: bool) -> tuple[int, mmap.mmap]:
        """Map `refs` of `domid`, one page each, in order: (index, mapping); unmap() it."""
        arg = pack_map_grant_ref(domid, refs)
        try:
            fcntl.ioctl(self.fd, IOCTL_GNTDEV_MAP_GRANT_REF, arg)
        except OSError as e:
            raise GrantError(f"gntdev refused grant refs {refs[:8]} of domain {domid}: {e.strerror}", errno_=e.errno) from None
        index = struct.unpack_from("=Q", arg, 8)[0]
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            m = mmap.mmap(self.fd, len(refs) * PAGE, mmap.MAP_SHARED, prot, offset=index)
        except OSError as e:
            self._unmap_ref(index, len(refs))
            raise GrantError(
                f"cannot map grant ref(s) {refs[:8]} of domain {domid} {'read-write' if writable else 'read-only'}: "
                f"{errno_name(e.errno)} ({e.strerror})", errno_=e.errno) from None
        self.live += len(refs)
        return index, m

    def unmap(self, index: int, m: mmap.mmap) -> None:
        count = len(m) // PAGE
        m.close()
        self._unmap_ref(index, count)
        self.live -= count

    def _unmap_ref(self, index: int, count: int) -> None:
        try:
            fcntl.ioctl(self.fd, IOCTL_GNTDEV_UNMAP_GRANT_REF, bytearray(struct.pack(UNMAP_GRANT_REF_FMT, index, count, 0)))
        except OSError:
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # releases whatever is still mapped
            self.fd = -1


def _set_unmap_notify(fd: int, request: int, index: int, offset: int | None, port: int | None) -> None:
    action = (UNMAP_NOTIFY_CLEAR_BYTE if offset is not None else 0) | (UNMAP_NOTIFY_SEND_EVENT if port is not None else 0)
    arg = bytearray(struct.pack(UNMAP_NOTIFY_FMT, index + (offset or 0), action, port or 0))
    try:
        fcntl.ioctl(fd, request, arg)
    except OSError as e:
        raise GrantError(f"set unmap notify (offset {offset}, port {port}) failed: {e.strerror}", errno_=e.errno) from None


def main(argv: list[str] | None = None) -> int:
    from .cmdline import run_main

    def loopback(pages: int = 2):
        """Share pages with this domain and map them back: each side sees the other's writes."""
        with SharedPages(0, pages) as shared, MappedPages(0, shared.refs) as mapped:
            shared.map[0:5] = b"hello"
            mapped.map[PAGE * (pages - 1): PAGE * (pages - 1) + 5] = b"world"
            return {
                "refs": shared.refs, "mapped_sees": bytes(mapped.map[0:5]).decode(),
                "sharer_sees": bytes(shared.map[PAGE * (pages - 1): PAGE * (pages - 1) + 5]).decode(),
            }

    def map_ref(domid: int, ref: int):
        """Map one grant ref of `domid` and report its first bytes (bad input gives a clear error)."""
        with MappedPages(domid, [ref]) as m:
            return {"domid": domid, "ref": ref, "head": bytes(m.map[:16]).hex()}

    return run_main({"loopback": loopback, "map": map_ref}, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
