"""Host side of domU management: validate a guest spec, make its kernel and
root (cached), ship them to dom0 once, and drive the dom0 agent (domctl)
over the lab's SSH connection, one round trip per operation."""

from __future__ import annotations

import base64
import builtins
import gzip
import hashlib
import io
import json
import secrets
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from xenlab import deploy, templates
from xenlab.agent.errors import ADDRESS_TAKEN, CRASHED_STARTING
from xenlab.agent.facts import BRIDGE, HOTPLUG_DIR
from xenlab.agent.facts import GUEST_SUBNET as SUBNET
from xenlab.agent.facts import GUESTS_DIR as REMOTE_GUESTS
from xenlab.agent.facts import IMAGES_DIR as REMOTE_IMAGES
from xenlab.agent.faultplan import FaultPlanError, format_plan, load_plan
from xenlab.agent.sysutil import atomic_write
from xenlab.build import dom0 as images
from xenlab.build import extras, rootfs
from xenlab.build import kernel as kernel_mod
from xenlab.build.kernel import minimal_vmlinux
from xenlab.config import parse_mib, validate_name
from xenlab.errors import ConfigError, GuestError
from xenlab.guest import coredump
from xenlab.guest.handle import Guest
from xenlab.guest.spec import GuestSpec, check_type_on_lab
from xenlab.lab.ssh import CommandResult, SSHSession
from xenlab.paths import cache_dir

if TYPE_CHECKING:
    from xenlab.lab import Lab

BACKENDS = ("kernel", "python")  # who serves a disk attached to a running guest


@dataclass(frozen=True)
class Prepared:
    """What prepare() shipped: dom0 paths of the kernel, root and System.map
    ("" when none), and the guest addresses in use."""

    kernel: str
    ramdisk: str
    used: set[str]
    symbol_map: str = ""


def _system_map_of(elf: Path) -> Path | None:
    """A System.map beside a user's kernel ELF, written from its symbols (None when stripped)."""
    target = elf.with_suffix(".map")
    if target.exists():
        return target
    listed = subprocess.run(["nm", "-n", str(elf)], capture_output=True, text=True) if shutil.which("nm") else None
    if listed is None or listed.returncode != 0 or not listed.stdout.strip():
        return None
    atomic_write(target, listed.stdout)
    return target


def render_xl_config(spec: GuestSpec, kernel: str, ramdisk: str, ip: str, mac: str) -> str:
    gdir = f"{REMOTE_GUESTS}/{spec.name}"
    quiet = "loglevel=1" if spec.kernel == "minimal" else "quiet loglevel=1"
    # HVM: the kernel's early PCI scans (the AGP aperture checks) are port I/O
    # that QEMU in dom0 answers one access at a time: ~30 s of a boot under TCG.
    early_pci = " pci=noearly" if spec.type == "hvm" else ""
    kept_off = f" xenlab.no_stock={','.join(spec.kept_off)}" if spec.kept_off else ""
    cmdline = f"console=hvc0 {quiet}{early_pci} xenlab.name={spec.name} xenlab.ip={ip}/24{kept_off} {spec.extra}".strip()
    disks = [{"vdev": name, "readonly": d.readonly, "path": f"{gdir}/{name}.img"} for name, d in zip(spec.vdevs(), spec.disks, strict=True)]
    return templates.render(
        "xl-guest.cfg.j2", name=spec.name, type=spec.type, kernel=kernel, ramdisk=ramdisk, cmdline=cmdline,
        memory=spec.memory, vcpus=spec.vcpus, disks=disks, net=spec.net, mac=mac, bridge=BRIDGE,
        hotplug={"block": f"{HOTPLUG_DIR}/block", "vif": f"{HOTPLUG_DIR}/vif"} if spec.hotplug == "xenlab" else None,
    )




def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def pick_address(used: set[str]) -> tuple[str, str]:
    """The lowest free SUBNET.10-250 address and a Xen-OUI MAC derived from it."""
    for host in range(10, 251):
        ip = f"{SUBNET}.{host}"
        if ip not in used:
            return ip, f"00:16:3e:58:4c:{host:02x}"
    raise GuestError("no free guest address left in the lab", "destroy some guests")


@dataclass
class Guests:
    """The domUs of one lab, driven over one SSH session to dom0."""

    lab: Lab
    _ssh: SSHSession | None = field(default=None, repr=False)
    _agent_ready: bool = field(default=False, repr=False)

    def ssh(self) -> SSHSession:
        if self._ssh is None:
            self._ssh = self.lab.ssh()
        return self._ssh

    def close(self) -> None:
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None

    def __enter__(self) -> Guests:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _agent(self) -> None:
        if not self._agent_ready:
            deploy.ensure_agent(self.ssh())
            self._agent_ready = True

    def agent(self, module: str, *args: str, request: dict | None = None, timeout: float = 300) -> Any:
        """Run an agent module in dom0: its JSON reply (a dict or a list, as the
        module and verb give), or its refusal as GuestError."""
        self._agent()
        stdin = json.dumps(request).encode() if request is not None else None
        status, out, err = deploy.run_agent(self.ssh(), module, *args, input=stdin, timeout=timeout)
        return deploy.agent_reply(out, err, status, f"the dom0 agent ({module} {' '.join(args)})", GuestError)

    def domctl(self, verb: str, *args: str, request: dict | None = None, timeout: float = 300) -> Any:
        return self.agent("domctl", verb, *args, request=request, timeout=timeout)

    # -- images ----------------------------------------------------------
    def check_type(self, spec: GuestSpec) -> None:
        """Refuse a guest type this lab's CPU model or Xen cannot run."""
        info = self.lab.require_up()
        # A Xen of the user's: its version is not known here; Xen itself will say.
        xen = None if info["boot"].get("user_xen") else self._image().manifest["xen_version"]
        qemu = (info.get("versions") or {}).get("qemu")  # a remote lab's is not recorded
        check_type_on_lab(spec.type, info["accel"], info["cpu"], xen, info["config"]["vcpus"], qemu)

    def _image(self) -> images.Dom0Image:
        return images.Dom0Image(images.images_dir() / self.lab.require_up()["image_id"])

    def _upload(self, local: Path, remote: str) -> None:
        """Copy a file into dom0 (content-named, so once); kernels travel
        gzipped (a PV vmlinux is mostly alignment padding)."""
        data = local.read_bytes()
        packed = local.suffix == ".gz"
        # A part file of its own: two creates at once may ship the same file.
        part = shlex.quote(f"{remote}.part-{secrets.token_hex(4)}")
        unpack = f"cat > {part}" if packed else f"gzip -dc > {part}"
        # Only a whole file gets its name: when this process dies mid-copy,
        # dom0's cat sees the end of its input and succeeds, and a truncated
        # ramdisk under the real name would fail every later create.
        self.ssh().check(
            f"mkdir -p {REMOTE_IMAGES} && {unpack} && [ \"$(stat -c %s {part})\" = {len(data)} ] && mv {part} {shlex.quote(remote)}"
            f" || {{ rm -f {part}; exit 1; }}",
            input=data if packed else gzip.compress(data, compresslevel=1), timeout=600,
        )

    def prepare(self, spec: GuestSpec) -> Prepared:
        """Build (cached) the kernel and root, and in one round trip learn
        whether dom0 has them and the agent, and which addresses are taken;
        ship what is missing. Returns their dom0 paths and the used addresses."""
        image = self._image()
        local_kernel, kernel_name, release, local_map = self._kernel(spec, image)
        minimal = kernel_mod.stock_modules(kernel_mod.build_minimal(cache_dir() / "guest", trust_stamp=True)) if spec.kernel == "minimal" else None
        stock = rootfs.stock_of(image, spec.root_flavour, minimal)
        unknown = [name for name in spec.kept_off if name not in stock]
        if unknown:
            raise ConfigError(f"--no-stock {', '.join(unknown)}: the {spec.kernel} kernel has no such stock module",
                              f"its stock modules: {', '.join(stock) or 'none'}")
        ramdisk = rootfs.build(image, spec.root, spec.root_flavour, cache_dir() / "guest", minimal)
        if spec.modules or spec.add:
            ramdisk = self._with_extras(spec, ramdisk, release)
        files = {f"{REMOTE_IMAGES}/{kernel_name}": local_kernel, f"{REMOTE_IMAGES}/{ramdisk.name}": ramdisk}
        symbol_map = f"{REMOTE_IMAGES}/{kernel_name}.map" if local_map or spec.kernel == "debian" else ""
        if local_map:
            files[symbol_map] = local_map
        probe = "; ".join(
            [deploy.agent_check_command()]
            + [f"test -s {shlex.quote(remote)} && echo have:{shlex.quote(remote)}" for remote in files]
            # Addresses in use: one claim file each (the agent's claim_address). Builtins only, as above.
            + [f"for a in {REMOTE_GUESTS}/.addresses/*; do [ -e \"$a\" ] && echo \"ip:${{a##*/}}\"; done"]
        )
        lines = self.ssh().run(probe).stdout.split()
        if "agent-current" not in lines:
            deploy.install_agent(self.ssh())
        self._agent_ready = True
        for remote, local in files.items():
            if f"have:{remote}" not in lines:
                self._upload(local, remote)
        if spec.kernel == "debian":
            # Debian's /boot/System.map is a stub; this kernel is dom0's own, so
            # dom0's kallsyms (without module symbols) is its map.
            part = shlex.quote(f"{symbol_map}.part-{secrets.token_hex(4)}")
            self.ssh().check(f"test -s {symbol_map} || {{ grep -v ']$' /proc/kallsyms > {part} && mv {part} {symbol_map}; }}")
        used = {line[3:] for line in lines if line.startswith("ip:")}
        return Prepared(f"{REMOTE_IMAGES}/{kernel_name}", f"{REMOTE_IMAGES}/{ramdisk.name}", used, symbol_map)

    def _kernel(self, spec: GuestSpec, image: images.Dom0Image) -> tuple[Path, str, str, Path | None]:
        """The guest kernel as a local ELF file, its name in dom0, its release,
        and its System.map when one exists here (for xenctx and cores).
        Every kernel goes over as plain ELF: dom0's domain builder would
        otherwise decompress a bzImage at every create (seconds under TCG)."""
        if spec.kernel == "minimal":
            built = kernel_mod.build_minimal(cache_dir() / "guest", trust_stamp=True)
            elf = minimal_vmlinux(built.bzimage)
            system_map = built.build_dir / "System.map"
            # Named by content: a rebuilt kernel must not meet its predecessor's copy in dom0.
            return elf, f"minimal-{_file_digest(built.bzimage)}.vmlinux", built.release, system_map if system_map.is_file() else None
        # An HVM guest's kernel is booted by QEMU (the device model), which takes a bzImage.
        if spec.kernel == "debian":
            if spec.type == "hvm":
                return image.kernel, f"debian-{image.id}.bzImage", image.manifest["kernel_version"], None
            return image.dom0_kernel, f"debian-{image.id}.vmlinux", image.manifest["kernel_version"], None
        kernel = extras.read_kernel(spec.kernel, pvh=spec.type == "pvh")
        if spec.type == "hvm":
            if kernel.kind != "bzImage":
                raise ConfigError(f"--kernel {spec.kernel} is an {kernel.kind}: an HVM guest boots a bzImage (QEMU loads it)",
                                  "give arch/x86/boot/bzImage of the same build")
            digest = hashlib.sha256(kernel.path.read_bytes()).hexdigest()[:16]
            return kernel.path, f"user-{digest}.bzImage", kernel.release, None
        digest = hashlib.sha256(kernel.elf).hexdigest()[:16]
        local = cache_dir() / "guest" / "user-kernels" / f"{digest}.vmlinux"
        if not local.exists():
            local.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(local, kernel.elf)
        return local, f"user-{digest}.vmlinux", kernel.release, _system_map_of(local)

    def _with_extras(self, spec: GuestSpec, base: Path, release: str) -> Path:
        """The guest's root with the user's modules, load list and files appended (checked first)."""
        modules = extras.find_modules(spec.modules) if spec.modules else {}
        extras.check_modules(modules, release)
        blob = extras.overlay(modules, extras.load_list(spec.load, modules), [extras.parse_add(a) for a in spec.add])
        target = cache_dir() / "guest" / "custom" / f"{base.name.removesuffix('.cpio.gz')}+{hashlib.sha256(blob).hexdigest()[:12]}.cpio.gz"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, base.read_bytes() + blob)  # concatenated archives: the kernel unpacks both
        return target

    # -- lifecycle -------------------------------------------------------
    def create(self, spec: GuestSpec, prepared: Prepared | None = None) -> dict:
        """Start the guest; `prepared` is prepare()'s result when the caller already ran it."""
        spec.validate()
        self.check_type(spec)
        prepared = prepared or self.prepare(spec)
        used = prepared.used
        for _ in range(2):
            try:
                return self._create(spec, prepared, used)
            except GuestError as e:
                if e.code != ADDRESS_TAKEN:
                    raise
                used = set(used) | {e.detail["address"]}  # taken meanwhile by a create running at the same time
        return self._create(spec, prepared, used)  # the third and last try

    def _create(self, spec: GuestSpec, prepared: Prepared, used: set[str]) -> dict:
        ip, mac = pick_address(used)
        request = {
            "name": spec.name, "memory": spec.memory, "vcpus": spec.vcpus, "root": spec.root, "kernel": spec.kernel,
            "kernel_file": prepared.kernel, "symbol_map": prepared.symbol_map,
            "ip": ip, "mac": mac, "net": spec.net, "timeout": spec.timeout, "hotplug": spec.hotplug, "no_stock": list(spec.kept_off),
            "disks": [
                {"path": f"{REMOTE_GUESTS}/{spec.name}/{name}.img", "vdev": name, "size_mib": d.size_mib, "readonly": d.readonly}
                for name, d in zip(spec.vdevs(), spec.disks, strict=True)
            ],
            "config": render_xl_config(spec, prepared.kernel, prepared.ramdisk, ip, mac),
        }
        assert spec.timeout is not None  # GuestSpec.__post_init__ put in the type's default
        try:
            return self.domctl("create", request=request, timeout=spec.timeout + 60)
        except GuestError as e:
            if e.code == CRASHED_STARTING:
                raise self._with_core(e) from None
            raise
        except KeyboardInterrupt:
            # Interrupted here (Ctrl-C, SIGTERM): the agent in dom0 goes on with
            # the create; take the guest down so nothing half-made stays.
            self._abandon(spec.name)
            raise

    def _with_core(self, error: GuestError) -> GuestError:
        """A guest that panicked while starting: its core fetched as destroy
        fetches a crashed guest's, and named in the error."""
        taken = error.detail.get("core")
        if not taken:
            return GuestError(error.message, "no core could be taken of it (see dom0's `xl dmesg`)")
        folder = self._fetch_core(taken, None)
        return GuestError(error.message, f"its core is in {folder} (`xenlab debug core-log {folder} --panic`)")

    def _abandon(self, name: str) -> None:
        try:
            with Guests(self.lab) as fresh:  # this session's channel may be mid-reply
                fresh.destroy(name, timeout=30)
        except Exception:  # noqa: BLE001 - best effort while interrupted; `guest list` shows a leftover
            pass

    def start(self, spec: GuestSpec) -> Guest:
        """create(), returning a Guest handle."""
        return Guest(self, self.create(spec))

    def get(self, name: str) -> Guest:
        """A handle on a running guest made earlier."""
        validate_name(name, "guest name")
        for row in self.list():
            if row["name"] == name and "domid" in row:
                return Guest(self, row)
        raise GuestError(f"no running guest named {name!r} in lab {self.lab.name}", "list them with `xenlab guest list`")

    def destroy(self, name: str, timeout: float = 30) -> dict:
        """Destroy the guest; a crashed one's core is taken first and fetched
        into the lab's cores/ folder (`core_dir` in the result), which keeps the
        newest `coredump.CORES_KEPT`."""
        validate_name(name, "guest name")
        result = self.domctl("destroy", name, "--timeout", str(timeout), timeout=timeout + 660)
        if "core" in result:
            result["core_dir"] = str(self._fetch_core(result["core"], None))
        return result

    def _fetch_core(self, taken: dict, dest: Path | None) -> Path:
        if dest is not None:
            return coredump.fetch(self.ssh(), taken, dest)
        own = self.lab.dir / "cores"
        folder = coredump.fetch(self.ssh(), taken, own)
        coredump.prune(own)
        return folder

    def dump_core(self, name: str, dest: Path | None = None) -> dict:
        """`xl dump-core` of a running or crashed guest, fetched with its kernel
        and System.map into `dest` (default: the lab's cores/ folder)."""
        validate_name(name, "guest name")
        taken = self.domctl("dump-core", name, timeout=660)
        return {**taken, "core_dir": str(self._fetch_core(taken, dest))}

    def list(self) -> list[dict]:
        return self.domctl("list")

    def console(self, name: str, lines: int = 40) -> dict:
        validate_name(name, "guest name")
        return self.domctl("console", name, "--lines", str(lines))

    def exec_bytes(self, name: str, command: str | Sequence[str], input: bytes = b"", timeout: float = 120) -> tuple[int, bytes, bytes]:
        """Run a command in the guest over its Xen console: (exit code, stdout, stderr) as bytes.
        A string is a shell command line; a list is an argv, run exactly as given."""
        validate_name(name, "guest name")
        reply = self.domctl("exec", name, request=_exec_request(command, input, timeout), timeout=timeout + 30)
        return reply["rc"], base64.b64decode(reply["stdout"]), base64.b64decode(reply["stderr"])

    def exec_stream(self, name: str, command: str | Sequence[str], stdout: BinaryIO, stderr: BinaryIO,
                    input: bytes = b"", timeout: float = 120) -> int:
        """exec_bytes(), with the command's output written to stdout and stderr
        as it comes (piece by piece, as the guest's pipes deliver it); its exit code."""
        validate_name(name, "guest name")
        request = {**_exec_request(command, input, timeout), "stream": True}
        self._agent()
        frames = _OutputFrames(stdout, stderr)
        agent_stderr = io.BytesIO()
        status = deploy.stream_agent(self.ssh(), "domctl", ["exec", name], json.dumps(request).encode(), frames.write, agent_stderr.write)
        reply = deploy.agent_reply(frames.rest(), agent_stderr.getvalue().decode(errors="replace"), status,
                                   f"the dom0 agent (domctl exec {name})", GuestError)
        return reply["rc"]

    def exec(self, name: str, command: str | Sequence[str], input: bytes = b"", timeout: float = 120) -> CommandResult:
        """exec_bytes(), with the output as text."""
        rc, out, err = self.exec_bytes(name, command, input, timeout)
        shown = command if isinstance(command, str) else shlex.join(command)
        return CommandResult(shown, rc, out.decode(errors="replace"), err.decode(errors="replace"))

    # -- disks attached to a running guest ------------------------------------
    def attach(self, name: str, size: str | int, backend: str = "kernel", readonly: bool = False, faults: str = "",
               vdev: str = "", timeout: float = 60, profile: bool = False, own_frontend: bool = False) -> dict:
        """Attach a new, empty disk of `size` (e.g. "16M") to a running guest,
        served by kernel blkback or by the Python backend in dom0 (`faults`: a
        fault plan, or the path of a plan file, for the Python backend).
        Returns when blkfront in the guest is Connected: {vdev, devid, backend, path, ...}.
        profile: run the Python backend under cProfile (its report at detach lists where the time went).
        own_frontend: the guest drives the disk with a frontend of its own (its
        blkfront kept off: GuestSpec.no_stock): return once
        the backend waits in InitWait."""
        validate_name(name, "guest name")
        if backend not in BACKENDS:
            raise ConfigError(f"unknown disk backend {backend!r}", f"use one of: {', '.join(BACKENDS)}")
        size_mib = size if isinstance(size, int) else parse_mib(size, f"--disk {size!r}")
        plan = ""
        if faults:
            if backend != "python":
                raise ConfigError("a fault plan needs the Python backend", "add --backend python")
            try:
                plan = format_plan(load_plan(faults))
            except FaultPlanError as e:
                raise ConfigError(str(e), "fault names and parameters: `xenlab guest attach --help`") from None
        args = ["attach", name, "--size-mib", str(size_mib), "--backend", backend, "--timeout", str(timeout)]
        args += (["--readonly"] if readonly else []) + (["--faults", plan] if plan else []) + (["--vdev", vdev] if vdev else [])
        args += ["--profile"] if profile and backend == "python" else []
        args += ["--own-frontend"] if own_frontend else []
        return self.agent("blkback", *args, timeout=timeout + 60)

    def detach(self, name: str, vdev: str, timeout: float = 30) -> dict:
        """Detach a disk attached with attach(): the backend closes it down, both
        XenStore directories and the disk file go. Returns the backend's report
        (for the Python backend: requests, errors, faults_fired, ...)."""
        validate_name(name, "guest name")
        return self.agent("blkback", "detach", name, vdev, "--timeout", str(timeout), timeout=timeout + 90)

    def attached(self, name: str) -> builtins.list[dict]:  # builtins: list is a method here
        validate_name(name, "guest name")
        return self.agent("blkback", "list", name)

    def check(self, name: str, timeout: float = 600) -> builtins.list[dict]:
        """Block and network ring I/O checks on the real frontends/backends (run in dom0)."""
        validate_name(name, "guest name")
        return self.agent("iocheck", name, timeout=timeout)


def _exec_request(command: str | Sequence[str], input: bytes, timeout: float) -> dict:
    """The dom0 agent's exec request: a string is a shell command line, a list an argv kept exactly."""
    script = command if isinstance(command, str) else shlex.join(command)
    return {"script": script, "stdin_b64": base64.b64encode(input).decode(), "timeout": timeout}


class _OutputFrames:
    """The dom0 agent's streamed exec output ("O base64" and "E base64" lines)
    written through to stdout and stderr; its other lines (the final JSON) kept."""

    def __init__(self, stdout: BinaryIO, stderr: BinaryIO):
        self._sinks = {b"O": stdout, b"E": stderr}
        self._partial = b""
        self._other: list[bytes] = []

    def write(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            sink = self._sinks.get(line[:1]) if line[1:2] == b" " else None
            if sink is None:
                self._other.append(line)
                continue
            sink.write(base64.b64decode(line[2:]))
            sink.flush()

    def flush(self) -> None:
        pass

    def rest(self) -> str:
        return b"\n".join(self._other + [self._partial]).decode(errors="replace")
