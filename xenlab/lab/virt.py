"""libvirt connections: the embedded QEMU driver per lab by default, or any URI.

The embedded driver needs libvirt's default event loop running in a thread
before the connection opens, or a reconnecting process sees the lab's domain
but cannot destroy it. Only one process may hold an embed root at a time, so
opening retries for a while on the pid-file lock."""

from __future__ import annotations

import atexit
import fcntl
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from xenlab.errors import LabError
from xenlab.paths import state_root
from xenlab.run import pid_alive

_libvirt_module = None


def _libvirt():
    """libvirt, imported on first use: commands that never touch a VM (config,
    --help, build) do not load it."""
    global _libvirt_module
    if _libvirt_module is None:
        # libvirt logs warnings (taint notes, security driver) straight to stderr;
        # keep them in a file (errors still arrive as exceptions). Must be set
        # before libvirt initializes.
        state_root().mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("LIBVIRT_LOG_OUTPUTS", f"3:file:{state_root() / 'libvirt.log'}")
        import libvirt

        # libvirt prints its own errors to stderr unless a handler is set.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        _libvirt_module = libvirt
    return _libvirt_module


_loop_started = False
_loop_lock = threading.Lock()


def _ensure_event_loop() -> None:
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        _libvirt().virEventRegisterDefaultImpl()

        def loop() -> None:
            while True:
                _libvirt().virEventRunDefaultImpl()

        threading.Thread(target=loop, name="libvirt-events", daemon=True).start()
        _loop_started = True


def library_version() -> int:
    """libvirt's version as libvirt encodes it (major * 1000000 + minor * 1000 + micro)."""
    return _libvirt().getVersion()


def library():
    """The libvirt module (imported on first use)."""
    return _libvirt()


def pool_dir(pool) -> str:
    """The directory of a 'dir' storage pool."""
    import xml.etree.ElementTree as ET

    path = ET.fromstring(pool.XMLDesc(0)).findtext("target/path")
    if path is None:
        raise LabError(f"libvirt's storage pool {pool.name()} names no directory (target/path)", "use a pool of type 'dir'")
    return path


def error_class() -> type[Exception]:
    """libvirt.libvirtError (for callers that catch it without importing libvirt)."""
    return _libvirt().libvirtError


def save_running_flag() -> int:
    """For save and restore: the domain runs (not paused) once restored."""
    return _libvirt().VIR_DOMAIN_SAVE_RUNNING


def uuid(dom) -> str:
    return dom.UUIDString()


def has_x86_64_emulator(conn) -> bool:
    """Whether the host's libvirt lists a QEMU for x86_64 guests."""
    import xml.etree.ElementTree as ET

    caps = ET.fromstring(conn.getCapabilities())
    return any(g.find("arch[@name='x86_64']/emulator") is not None for g in caps.findall("guest"))


# -- storage pools (a lab on a remote libvirt host keeps its files in one) --------------
def dir_pool(conn, name: str, place: Callable[[], str]):
    """The directory pool `name`, defined at `place()` (made, autostarted) the
    first time, started if it is not, refreshed: each call is a few round
    trips, so callers look it up once for their uploads and deletes."""
    try:
        pool = conn.storagePoolLookupByName(name)
    except error_class():
        xml = f"<pool type='dir'><name>{name}</name><target><path>{place()}</path></target></pool>"
        pool = conn.storagePoolDefineXML(xml, 0)
        pool.build(0)
        pool.setAutostart(1)
    if not pool.isActive():
        pool.create(0)
    pool.refresh(0)
    return pool


def pool_free_bytes(pool) -> int:
    return pool.info()[3]


def volume_path(pool, name: str, size: int) -> str | None:
    """The path of volume `name` if the pool has it at `size` bytes (a finished
    upload: names come from content-addressed cache entries), else None."""
    try:
        vol = pool.storageVolLookupByName(name)
    except error_class():
        return None
    return vol.path() if vol.info()[1] == size else None


def upload_volume(pool, local: Path, name: str, size: int) -> str:
    """`local` as a new raw volume `name` of `size` bytes; its path. Half an
    upload is deleted again."""
    vol = pool.createXML(f"<volume><name>{name}</name><capacity unit='bytes'>{size}</capacity>"
                         "<target><format type='raw'/></target></volume>", 0)
    stream = pool.connect().newStream(0)
    try:
        vol.upload(stream, 0, size, 0)
        with open(local, "rb") as f:
            stream.sendAll(lambda _stream, n, f: f.read(n), f)
        stream.finish()
    except BaseException:
        try:
            stream.abort()
            vol.delete(0)
        except error_class():
            pass
        raise
    return vol.path()


def qcow2_overlay(pool, name: str, backing: str, capacity: int) -> str:
    """A new qcow2 volume backed by the qcow2 volume at `backing`; its path."""
    vol = pool.createXML(f"<volume><name>{name}</name><capacity unit='bytes'>{capacity}</capacity>"
                         "<target><format type='qcow2'/></target>"
                         f"<backingStore><path>{backing}</path><format type='qcow2'/></backingStore></volume>", 0)
    return vol.path()


def delete_volumes(pool, *names: str) -> None:
    for name in names:
        try:
            pool.storageVolLookupByName(name).delete(0)
        except error_class():
            pass


def create(conn, xml: str):
    """Start a transient domain from its XML; the domain."""
    return conn.createXML(xml, 0)


def save(dom, path: Path) -> None:
    """Save the running domain's memory to `path` (the domain stops); restored, it runs."""
    dom.saveFlags(str(path), None, save_running_flag())


def restore(conn, path: Path, xml: str) -> None:
    """Start the domain saved in `path` with the definition `xml`, running."""
    conn.restoreFlags(str(path), xml, save_running_flag())


# A UNIX socket path holds at most 107 bytes (sun_path, with its NUL), and
# libvirt puts QEMU's monitor at ROOT/lib/qemu/domain-ID-NAME/monitor.sock,
# NAME being the domain name cut to 20 characters.
_UNIX_PATH_MAX = 107
_MONITOR_TAIL = len("/lib/qemu/domain-99999-") + 20 + len("/monitor.sock")


def embed_root_fits(root: Path) -> bool:
    """Whether libvirt can bind its monitor sockets below the embed root `root`."""
    return len(str(root)) + _MONITOR_TAIL <= _UNIX_PATH_MAX


def embed_uri(root: Path) -> str:
    return f"qemu:///embed?root={root}"


def prepare_embed_root(root: Path, shared_cache: Path) -> None:
    # QEMU capability probing takes seconds per fresh root; libvirt validates
    # the cache against the QEMU binary and its own version, so labs share it.
    caps = root / "cache" / "qemu"
    if not caps.is_symlink():
        caps.parent.mkdir(parents=True, exist_ok=True)
        shared_cache.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(caps, ignore_errors=True)
        caps.symlink_to(shared_cache)
    conf = root / "etc" / "qemu.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        # No virtlogd in embedded mode: QEMU's stdio goes to a file.
        'stdio_handler = "file"',
        'security_driver = "none"',
    ]
    if os.geteuid() == 0:
        # The cached images belong to root; QEMU would otherwise run as libvirt-qemu.
        lines += ['user = "root"', 'group = "root"', "dynamic_ownership = 0"]
    conf.write_text("\n".join(lines) + "\n")


# One connection per URI for the life of the process. libvirt registers the
# embedded QEMU driver again at every open and never gives the slot back: a
# process can open an embed URI only about 20 times ("Too many drivers, cannot
# register QEMU"), which a pytest session resetting its lab per test, or a
# soak, reaches. The cost: while a process holds a lab's embed root, other
# processes wait for it (see connect).
_connections: dict[tuple[str, int], Any] = {}  # libvirt.virConnect (libvirt-python has no types)
_connections_lock = threading.Lock()


def _root_identity(uri: str) -> int:
    """For an embed URI, the inode of its root (a root removed and made again is
    another driver's state); 0 otherwise."""
    if not uri.startswith("qemu:///embed?root="):
        return 0
    try:
        return os.stat(uri.split("root=", 1)[1]).st_ino
    except OSError:
        return 0


@contextmanager
def connect(uri: str, lock_wait: float = 30.0):
    """A libvirt connection to `uri` (kept open for the next caller in this process)."""
    _ensure_event_loop()
    key = (uri, _root_identity(uri))
    with _connections_lock:
        conn = _connections.get(key)
        if conn is not None and not _alive_connection(conn):
            del _connections[key]
            conn = None
        if conn is None:
            conn = _open(uri, lock_wait)
            _connections[key] = conn
    yield conn


@atexit.register
def _close_connections() -> None:
    """Close the cached connections while libvirt's module still exists: left to
    the interpreter's teardown, virConnect.__del__ runs after libvirtmod is gone
    and prints an AttributeError at exit. Domains keep running, as at any exit."""
    with _connections_lock:
        for conn in _connections.values():
            try:
                conn.close()
            except Exception:  # an exit must not fail on a connection libvirt already dropped
                pass
        _connections.clear()


def _alive_connection(conn) -> bool:
    try:
        return conn.isAlive() == 1
    except _libvirt().libvirtError:
        return False


def _open(uri: str, lock_wait: float):
    deadline = time.monotonic() + lock_wait
    while True:
        try:
            return _libvirt().open(uri)
        except _libvirt().libvirtError as e:
            msg = str(e)
            if "Failed to acquire pid file" in msg and time.monotonic() < deadline:
                time.sleep(0.2)  # another xenlab process holds this lab's embed root
                continue
            if "already open with path" in msg:
                # libvirt's embedded driver serves one root per process, for the life of the process.
                raise LabError(
                    "this process already drives another lab through libvirt's embedded driver, "
                    "which libvirt allows for one lab per process",
                    "drive each lab from its own process (e.g. run `xenlab` as a subprocess, or one pytest-xdist worker per lab), "
                    "or use a libvirt daemon for all of them ([lab] connect = \"qemu:///system\")",
                ) from None
            raise LabError(
                f"cannot connect to libvirt at {uri.split('?')[0]}: {msg}",  # not the URI's key and known_hosts paths
                "check the URI (e.g. qemu:///system, qemu+ssh://host/system) and that libvirtd runs there"
                if "embed" not in uri
                else "another xenlab process holds this lab's libvirt (a long-running one keeps it until it exits); "
                     "retry when it has finished",
            ) from None


def drop_dead_record(root: Path, name: str) -> int | None:
    """Forget domain `name` in the embedded driver of `root` by hand when its
    status file records a job and no live process drives that root: end the
    QEMU the file names (only if that process is this domain's QEMU) and
    remove the status file, pid file and private directory. A xenlab process
    killed while libvirt ran a job on the domain (a restore) leaves the job
    recorded there, and the next driver to load it waited on it for good:
    "cannot acquire state change lock" from every destroy. For callers that mean to destroy the
    domain and hold the lab's lock; a process that drives the root itself
    (its connection cached here, or holding the driver's pid-file lock) is
    left to destroy it through libvirt. The QEMU pid ended, if any."""
    run = root / "run" / "qemu"
    status = run / f"{name}.xml"
    if not status.exists() or any(uri == embed_uri(root) for uri, _ in _connections):
        return None
    try:
        lock = os.open(run / "driver.pid", os.O_RDWR)
    except FileNotFoundError:
        lock = None
    try:
        if lock is not None:
            try:
                fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return None  # a live driver holds the root: libvirt there destroys it
        record = status.read_text(errors="replace")
        if not re.search(r"<job\b", record):
            return None  # no job was running: libvirt's own reconnect and destroy clean up after it
        # Killed early, the record says pid 0 (QEMU not started yet, as far as
        # libvirt knew) while QEMU may already have written its pid file.
        pids = {int(found.group(1))} if (found := re.search(r"<domstatus\b[^>]*\bpid='(\d+)'", record)) else set()
        try:
            pids.add(int((run / f"{name}.pid").read_text().strip()))
        except (OSError, ValueError):
            pass
        ended = None
        for pid in sorted(pids):
            if pid > 0 and _live_qemu_of(pid, name):
                ended = pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                deadline = time.monotonic() + 10
                while _live_qemu_of(pid, name) and time.monotonic() < deadline:
                    time.sleep(0.05)
        for path in (status, run / f"{name}.pid"):
            path.unlink(missing_ok=True)
        for private in (root / "lib" / "qemu").glob(f"domain-*-{name[:20]}"):  # libvirt cuts the name to 20
            shutil.rmtree(private, ignore_errors=True)
        return ended
    finally:
        if lock is not None:
            os.close(lock)


def runs_domain(pid: int, name: str) -> bool:
    """Whether process `pid` is a QEMU that libvirt started for domain `name`
    (its `-name guest=NAME,...`), not another process that reuses the pid."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return any(f"guest={name}{end}".encode() in cmdline for end in (",", "\0"))


def _live_qemu_of(pid: int, name: str) -> bool:
    return pid_alive(pid) and runs_domain(pid, name)  # pid_alive: not a zombie waiting to be reaped


def lookup(conn, name: str):
    try:
        return conn.lookupByName(name)
    except _libvirt().libvirtError as e:
        if e.get_error_code() == _libvirt().VIR_ERR_NO_DOMAIN:
            return None
        raise


def monitor(dom, command: str) -> str:
    """Run a QEMU human-monitor command in the domain (e.g. `gdbserver ...`); its output."""
    _libvirt()
    import libvirt_qemu

    return libvirt_qemu.qemuMonitorCommand(dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)


def is_running(dom) -> bool:
    try:
        return bool(dom.isActive())
    except _libvirt().libvirtError:
        return False


def destroy(dom, timeout: float = 20.0) -> None:
    """Stop the domain and wait until libvirt reports it gone."""
    try:
        if dom.isActive():
            dom.destroy()
    except _libvirt().libvirtError as e:
        if e.get_error_code() != _libvirt().VIR_ERR_NO_DOMAIN and "not running" not in str(e):
            raise
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and is_running(dom):
        time.sleep(0.1)
    try:
        if dom.isPersistent():
            dom.undefine()
    except _libvirt().libvirtError:
        pass
