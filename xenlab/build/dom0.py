"""The dom0 image: a Debian rootfs on an ext4 disk, Xen, dom0's kernel and a
tiny initramfs. Cached under the user's cache dir by a hash of the recipe, so
an unchanged recipe is never rebuilt."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from xenlab import templates
from xenlab.agent.facts import NETWORK, XEN_BIN, XEN_VERSIONS
from xenlab.build import initramfs, kit
from xenlab.build.kernel import decompress_bzimage
from xenlab.config import LabConfig
from xenlab.errors import HostError
from xenlab.paths import cache_dir, sweep_stale_work, work_dir
from xenlab.progress import Steps
from xenlab.run import STOP_GRACE_S, run, term_when_parent_dies

BUILD_VERSION = 7
DOM0_PACKAGES = (
    "linux-image-amd64",
    "xenstore-utils",
    "qemu-system-xen",  # the device model of HVM guests (with SeaBIOS)
    "openssh-server",
    "python3",
    "iproute2",
    "busybox",
    "kmod",
    "procps",
    "socat",
    "mount",
    "e2fsprogs",
)


def dom0_packages(cfg: LabConfig) -> tuple[str, ...]:
    """What mmdebstrap installs: the suite's Xen, DOM0_PACKAGES and the user's extra packages."""
    xen = XEN_VERSIONS[cfg.dom0.suite]
    return (f"xen-hypervisor-{xen}-amd64", f"xen-utils-{xen}", *DOM0_PACKAGES, *cfg.dom0.extra_packages)


# Loaded by the dom0 init: backends and the devices under /dev/xen.
DOM0_MODULES = ("xenfs", "xen-evtchn", "xen-gntdev", "xen-gntalloc", "xen-blkback", "xen-netback", "loop", "bridge", "virtio_net")
XEN_DEVICES = ("evtchn", "gntdev", "gntalloc", "privcmd", "xenbus")
# Driver trees a headless PV dom0 never loads; pruning halves the image.
PRUNED_MODULE_DIRS = (
    "sound", "drivers/gpu", "drivers/media", "drivers/net/wireless", "drivers/infiniband",
    "drivers/staging", "drivers/bluetooth", "net/bluetooth", "net/wireless", "net/mac80211",
    "drivers/iio", "drivers/hid", "drivers/input", "drivers/usb", "drivers/scsi", "drivers/mmc",
    "drivers/isdn", "drivers/video", "drivers/thunderbolt",
)
INIT_SCRIPT = "/usr/local/sbin/xenlab-dom0-init"
SOURCES_FILES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))


@dataclass(frozen=True)
class Dom0Image:
    """A built, cached dom0 image."""

    path: Path

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def manifest(self) -> dict:
        return json.loads((self.path / "manifest.json").read_text())

    rootfs = property(lambda self: self.path / "rootfs.img")
    xen = property(lambda self: self.path / "xen")
    kernel = property(lambda self: self.path / "vmlinuz")
    # What Xen loads as dom0: the same kernel, already decompressed.
    dom0_kernel = property(lambda self: self.path / "vmlinux")
    initramfs = property(lambda self: self.path / "initramfs.cpio")
    domu_kit = property(lambda self: self.path / "domu-kit")

    @property
    def host_key(self) -> str:
        """dom0's ed25519 host key, 'ssh-ed25519 BASE64', recorded at build time."""
        return self.manifest["ssh_host_key"]


def rootfs_qcow2(image: Dom0Image) -> Path:
    """The image's disk as qcow2 (made once beside it): what a remote lab
    uploads, a fifth of the sparse raw file's 2 GiB."""
    target = image.path / "rootfs.qcow2"
    if not target.exists():
        part = target.with_suffix(f".part-{os.getpid()}")
        try:
            run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", image.rootfs, part])
            part.rename(target)
        finally:
            part.unlink(missing_ok=True)
    return target


def recipe(cfg: LabConfig) -> dict:
    return {
        "build_version": BUILD_VERSION,
        "suite": cfg.dom0.suite,
        "packages": sorted(dom0_packages(cfg)),
        "disk_size": cfg.dom0.disk_size,
        "modules": DOM0_MODULES,
        "pruned": PRUNED_MODULE_DIRS,
        "network": NETWORK,
        "templates": {
            name: hashlib.sha256(templates.source(name).encode()).hexdigest()
            for name in ("dom0-init.sh.j2", "inittab.j2", "initramfs-init.sh.j2")
        },
    }


def recipe_id(cfg: LabConfig) -> str:
    digest = hashlib.sha256(json.dumps(recipe(cfg), sort_keys=True).encode()).hexdigest()
    return f"dom0-{cfg.dom0.suite}-{digest[:12]}"


def images_dir() -> Path:
    return cache_dir() / "images"


def find(cfg: LabConfig, steps: Steps | None = None) -> Dom0Image | None:
    """The cached image for this recipe, checked against its manifest; a
    damaged one is removed (and so rebuilt), never booted."""
    image = Dom0Image(images_dir() / recipe_id(cfg))
    if not (image.path / "manifest.json").exists():
        return None
    problem = verify(image)
    if problem:
        if steps is not None:
            steps.note(f"dom0 image {image.id} is damaged ({problem}): removing it, it will be rebuilt")
        doomed = image.path.with_name(f".damaged-{image.id}-{os.getpid()}")
        image.path.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        return None
    return image


VERIFIED = ("xen", "vmlinux", "vmlinuz", "initramfs.cpio", "rootfs.img")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_hashes(directory: Path) -> dict:
    return {name: {"size": (directory / name).stat().st_size, "sha256": _sha256(directory / name)} for name in VERIFIED}


def verify(image: Dom0Image) -> str | None:
    """What is wrong with the image's files, or None. A file is hashed again
    only when its size or mtime changed since it was last found intact."""
    files = image.manifest.get("files")
    if not files:
        return None  # built before images recorded their hashes
    stamp = image.path / "verified.json"
    try:
        known = json.loads(stamp.read_text())
    except (OSError, ValueError):
        known = {}
    for name, want in files.items():
        try:
            st = (image.path / name).stat()
        except FileNotFoundError:
            return f"{name} is missing"
        if st.st_size != want["size"]:
            return f"{name} has {st.st_size} bytes, its manifest says {want['size']}"
        if known.get(name) == [st.st_size, st.st_mtime_ns]:
            continue
        if _sha256(image.path / name) != want["sha256"]:
            return f"{name} does not match the hash in its manifest"
        known[name] = [st.st_size, st.st_mtime_ns]
    stamp.write_text(json.dumps(known))
    return None


def apt_sources() -> Path:
    for candidate in SOURCES_FILES:
        if candidate.exists() and candidate.stat().st_size:
            return candidate
    raise HostError(
        "no apt sources file found (looked for " + ", ".join(map(str, SOURCES_FILES)) + ")",
        "mmdebstrap takes the host's apt sources as its mirror; configure apt on this host first",
    )


def host_codename() -> str:
    """This host's Debian codename (VERSION_CODENAME in os-release), or ''."""
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return ""
    found = re.search(r"^VERSION_CODENAME=\"?([a-z]+)", text, re.M)
    return found[1] if found else ""


def suite_sources(host_sources: Path, suite: str, target: Path) -> Path:
    """The host's apt sources for another suite: its own file when the host
    runs `suite`, else a copy at `target` with the host's codename replaced
    (bookworm, bookworm-updates, bookworm-security -> trixie, ...)."""
    codename = host_codename()
    text = host_sources.read_text()
    if not codename or codename == suite or not re.search(rf"\b{codename}\b", text):
        return host_sources
    target.write_text(re.sub(rf"\b{codename}(?=[-\s]|$)", suite, text, flags=re.M))
    return target


def build(cfg: LabConfig, steps: Steps, force: bool = False) -> Dom0Image:
    """Build the dom0 image unless one with the same recipe is cached."""
    if not force and (image := find(cfg, steps)):
        steps.note(f"dom0 image {image.id} is cached")
        return image
    if os.geteuid() != 0:
        return _build_in_user_namespace(cfg, steps, force)
    final = images_dir() / recipe_id(cfg)
    images_dir().mkdir(parents=True, exist_ok=True)
    for line in sweep_stale_work(images_dir(), "."):
        steps.note(line)
    _check_space(images_dir(), need_mib=cfg.dom0.disk_size + 1024)
    work = work_dir(images_dir(), f".{final.name}.")
    xen_version = XEN_VERSIONS[cfg.dom0.suite]
    log_file = work / "build.log"
    started = time.monotonic()
    try:
        out = work / "image"
        out.mkdir()
        rootfs = work / "rootfs"
        with steps.step(f"build dom0 image {final.name}"):
            with steps.step(f"mmdebstrap {cfg.dom0.suite} (log: {log_file})"):
                _mmdebstrap(cfg, rootfs, log_file, steps)
            with steps.step("customize rootfs"):
                kver = _customize(rootfs, xen_version, log_file)
            with steps.step("initramfs"):
                initramfs.build_dom0(rootfs / "lib/modules" / kver, out / "initramfs.cpio", work)
            with steps.step("extract Xen and dom0 kernel"):
                host_key = _extract_boot(rootfs, kver, xen_version, out)
            with steps.step("domU kit (python3, Debian guest modules)"):
                kit.export(rootfs, kver, out / "domu-kit", log_file)
            with steps.step(f"mkfs.ext4 -d ({cfg.dom0.disk_size}M)"):
                _mkfs(rootfs, out / "rootfs.img", cfg.dom0.disk_size, log_file, steps)
            manifest = {
                "id": final.name,
                "recipe": recipe(cfg),
                "kernel_version": kver,
                "xen_version": xen_version,
                "ssh_host_key": host_key,
                "built_at": time.time(),
                "build_seconds": round(time.monotonic() - started, 1),
                "timings": dict(steps.timings),
                "files": file_hashes(out),  # checked before each use
            }
            (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
            shutil.move(log_file, out / "build.log")
            if final.exists():
                shutil.rmtree(final)
            out.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Dom0Image(final)


def _check_space(where: Path, need_mib: int) -> None:
    free = shutil.disk_usage(where).free // (1024 * 1024)
    if free < need_mib:
        raise HostError(f"only {free} MiB free under {where}, the build needs about {need_mib} MiB", "free some disk space or set XENLAB_CACHE to a bigger filesystem")


def in_user_namespace() -> bool:
    """Whether this process is root only in a user namespace (uid 0 not the host's)."""
    try:
        first = Path("/proc/self/uid_map").read_text().split()
    except OSError:
        return False
    return first[:3] != ["0", "0", "4294967295"]


_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def subid_setup_hint(user: str) -> str:
    """What root does once so that `user` can build images in a user namespace."""
    return (f"once, as root: apt-get install uidmap; usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user} "
            f"(ci/setup-host.sh does this)")


def user_namespace_problem() -> str | None:
    """Why an ordinary user cannot build the image here (None: it can)."""
    for tool, package in (("unshare", "util-linux"), ("newuidmap", "uidmap"), ("newgidmap", "uidmap")):
        if not shutil.which(tool, path=_SBIN_PATH):
            return f"{tool} is missing (package {package})"
    user = pwd.getpwuid(os.getuid()).pw_name
    for table in ("/etc/subuid", "/etc/subgid"):
        try:
            owners = {line.split(":")[0] for line in Path(table).read_text().splitlines() if ":" in line}
        except OSError:
            owners = set()
        if user not in owners and str(os.getuid()) not in owners:
            return f"{table} gives {user} no subordinate ids"
    return None


def _build_in_user_namespace(cfg: LabConfig, steps: Steps, force: bool) -> Dom0Image:
    """The same build, run as root of a user namespace: mmdebstrap, chroot and
    mkfs.ext4 -d see the image's owners (root, _apt, ...) as they are, mapped
    to this user's subordinate ids on the host. Only that namespace can
    remove what it made, so the child also sweeps and cleans up itself."""
    problem = user_namespace_problem()
    if problem:
        user = pwd.getpwuid(os.getuid()).pw_name
        raise HostError(f"building the dom0 image as {user} (not root) needs a user namespace with subordinate ids: {problem}",
                        f"{subid_setup_hint(user)}; or run `sudo xenlab build`")
    unshare = shutil.which("unshare", path=_SBIN_PATH)
    assert unshare is not None  # user_namespace_problem() found it
    argv = [unshare, "--user", "--map-root-user", "--map-auto", "--mount", "--",
            sys.executable, "-m", "xenlab.build.dom0", json.dumps({"config": cfg.to_dict(), "force": force, "quiet": steps.quiet})]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, env={**os.environ, "PATH": _SBIN_PATH}, preexec_fn=term_when_parent_dies)
    try:
        out, _ = child.communicate()
    except BaseException:
        # It stops its own mmdebstrap and removes its scratch (SIGINT reached it too from a terminal).
        child.send_signal(signal.SIGINT)
        try:
            child.wait(STOP_GRACE_S * 2)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        raise
    if child.returncode != 0:
        raise HostError(f"the dom0 image build in a user namespace failed (exit {child.returncode}); its error is above",
                        "see the build log it names")
    return Dom0Image(Path(json.loads(out)["path"]))


def _namespace_main(request: str) -> int:
    """The child of _build_in_user_namespace: build, print the image's path."""
    from xenlab.errors import XenlabError

    args = json.loads(request)
    # SIGTERM (from the parent, or when it dies) as Ctrl-C: the build cleans up.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        image = build(LabConfig.from_dict(args["config"]), Steps(quiet=args["quiet"]), force=args["force"])
    except XenlabError as e:
        print(f"error: {e.message}" + (f"\nhint: {e.hint}" if e.hint else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(json.dumps({"path": str(image.path)}))
    return 0


def _mmdebstrap(cfg: LabConfig, rootfs: Path, log_file: Path, steps: Steps) -> None:
    packages = ",".join(dom0_packages(cfg))
    # In a user namespace mknod and mounting /proc and /sys fail; unshare mode
    # bind-mounts them instead (dev nodes are left out: dom0's init mounts devtmpfs).
    sources = suite_sources(apt_sources(), cfg.dom0.suite, log_file.parent / "apt.sources")
    namespaced = in_user_namespace()
    mode = "unshare" if namespaced else "root"
    # As real root, in a mount namespace of its own: the chroot's /proc, /sys
    # and /dev/pts mounts go with it even when it is killed mid-way.
    private_mounts = [] if namespaced else ["unshare", "--mount", "--propagation", "private", "--"]
    # --verbose: only then does mmdebstrap pass on apt's and dpkg's per-package
    # lines (off a terminal it otherwise prints just its few "I:" lines).
    run(
        [*private_mounts, "mmdebstrap", "--verbose", f"--mode={mode}", "--variant=minbase", f"--include={packages}", cfg.dom0.suite, rootfs, sources],
        log_file=log_file,
        on_line=PackageProgress(steps),
        hint="check that the host's apt sources work (`apt-get update`) and that every extra package exists",
    )


class PackageProgress:
    """An on_line callback for mmdebstrap --verbose: its own steps ("I: ..."
    lines) as they come, then packages downloaded, unpacked and set up, of
    the total apt states on each of its two runs ("69 newly installed")."""

    # A phase's per-package line, and what its count is called.
    PHASES = {
        "downloading": (re.compile(r"^Get:\d+ "), "packages downloaded"),
        "unpacking": (re.compile(r"^Unpacking \S+ "), "packages unpacked"),
        "configuring": (re.compile(r"^Setting up \S+ "), "packages set up"),
    }
    TOTAL = re.compile(r"\b(\d+) newly installed\b")

    def __init__(self, steps: Steps):
        self._steps = steps
        self.total = 0
        self.counts = dict.fromkeys(self.PHASES, 0)
        self.phase = ""  # "" while mmdebstrap's own step runs
        self.said = ""  # that step, as mmdebstrap said it

    def __call__(self, line: str) -> None:
        if self.feed(line):
            self.show()

    def feed(self, line: str) -> bool:
        """Take one output line; whether what to show changed."""
        # mmdebstrap announces each of its steps so ("I: extracting archives...");
        # maintainer scripts print other "I: " lines while packages are set up.
        if line.startswith("I: ") and line.endswith("..."):
            self.phase, self.said = "", line[3:]
            return True
        if found := self.TOTAL.search(line):
            self.total += int(found[1])
            return bool(self.phase)
        for phase, (pattern, _) in self.PHASES.items():
            # Before apt said how many packages, its Get: lines fetch indexes (apt-get update).
            if pattern.match(line) and (self.total or phase != "downloading"):
                self.phase = phase
                self.counts[phase] += 1
                return True
        return False

    def show(self) -> None:
        if not self.phase:
            self._steps.status(self.said)
            return
        unit = self.PHASES[self.phase][1]
        self._steps.progress(self.counts[self.phase], self.total or None, f"{self.phase}:", unit)


def _mkfs(rootfs: Path, image: Path, size_mib: int, log_file: Path, steps: Steps) -> None:
    data_mib = _tree_bytes(rootfs) >> 20
    steps.status(f"writing {data_mib} MiB of files into {image.name} ({size_mib} MiB ext4)")
    # mkfs.ext4 -d prints nothing while it copies: watch the image fill up.
    # An empty ext4 already takes ~1/32 of its size (journal, inode tables:
    # 33 MiB of 1 GiB, 66 of 2 GiB), which the image fills too.
    with _watch_growth(image, data_mib + size_mib // 32, steps, f"written to {image.name}:"):
        run(["mkfs.ext4", "-q", "-F", "-L", "xenlab-dom0", "-d", rootfs, image, f"{size_mib}M"], log_file=log_file)


def _tree_bytes(root: Path) -> int:
    """The disk space of what is under root (as du: blocks, not sizes; links not followed)."""
    total = 0
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            try:
                total += os.lstat(os.path.join(parent, name)).st_blocks * 512
            except OSError:  # gone meanwhile: nothing to copy
                pass
    return total


@contextmanager
def _watch_growth(path: Path, total_mib: int, steps: Steps, detail: str, every_s: float = 0.5):
    """While the body runs, show how many MiB `path` has allocated, of an
    estimated total (describe() copes with passing it)."""
    stop = threading.Event()

    def report() -> None:
        try:
            used = path.stat().st_blocks * 512
        except FileNotFoundError:  # not created yet
            return
        steps.progress(used >> 20, total_mib or None, detail, "MiB")

    def poll() -> None:
        while not stop.wait(every_s):
            report()

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
    report()  # the final size, which the last poll may have missed


def _customize(rootfs: Path, xen_version: str, log_file: Path) -> str:
    (kver,) = [p.name for p in (rootfs / "lib/modules").iterdir()]
    # One path to Xen's tools whatever the suite's Xen (see facts.XEN_BIN).
    xen_bin = rootfs / XEN_BIN.lstrip("/")
    xen_bin.parent.mkdir(parents=True, exist_ok=True)
    xen_bin.symlink_to(f"/usr/lib/xen-{xen_version}/bin")
    moddir = rootfs / "lib/modules" / kver / "kernel"
    for sub in PRUNED_MODULE_DIRS:
        shutil.rmtree(moddir / sub, ignore_errors=True)
    run(["depmod", "-b", rootfs, kver], log_file=log_file)
    for stale in (rootfs / "boot").glob("initrd.img-*"):
        stale.unlink()
    for key in (rootfs / "etc/ssh").glob("ssh_host_*"):
        if "ed25519" not in key.name:
            key.unlink()
    init = rootfs / INIT_SCRIPT.lstrip("/")
    init.parent.mkdir(parents=True, exist_ok=True)
    init.write_text(
        templates.render(
            "dom0-init.sh.j2", xen_bin=XEN_BIN, hostname="xenlab-dom0", modules=DOM0_MODULES, xen_devices=XEN_DEVICES, **NETWORK
        )
    )
    init.chmod(0o755)
    (rootfs / "etc/inittab").write_text(templates.render("inittab.j2", init_script=INIT_SCRIPT))
    (rootfs / "etc/hostname").write_text("xenlab-dom0\n")
    (rootfs / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 xenlab-dom0\n")
    # No PAM: its session modules cost ~0.3 s per connection under TCG, and a
    # lab has one key-only root login. Without pam_env, PATH comes from SetEnv.
    (rootfs / "etc/ssh/sshd_config.d/xenlab.conf").write_text(
        "PasswordAuthentication no\nPermitRootLogin prohibit-password\nUseDNS no\nHostKey /etc/ssh/ssh_host_ed25519_key\n"
        f"UsePAM no\nSetEnv PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:{XEN_BIN}\n"
    )
    # Xen's tools look here for xenstore-ls and friends; keep them on PATH for ssh sessions too.
    (rootfs / "root/.profile").write_text(f"export PATH=$PATH:{XEN_BIN}\n")
    (rootfs / "etc/environment").write_text(f"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:{XEN_BIN}\n")
    return kver










def _extract_boot(rootfs: Path, kver: str, xen_version: str, out: Path) -> str:
    (xen_gz,) = (rootfs / "boot").glob(f"xen-{xen_version}*-amd64.gz")
    # QEMU's multiboot loader takes the plain ELF, not the gzip.
    (out / "xen").write_bytes(gzip.decompress(xen_gz.read_bytes()))
    bzimage = rootfs / "boot" / f"vmlinuz-{kver}"
    shutil.copy2(bzimage, out / "vmlinuz")
    (out / "vmlinux").write_bytes(decompress_bzimage(bzimage.read_bytes()))
    pub = (rootfs / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()
    return f"{pub[0]} {pub[1]}"


if __name__ == "__main__":
    sys.exit(_namespace_main(sys.argv[1]))
