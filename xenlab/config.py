"""One frozen dataclass tree for the lab's settings: defaults from
xenlab/data/default.toml, then a user TOML file, then command-line overrides.
Unknown keys and bad values are errors that name the key."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from xenlab.agent.facts import XEN_VERSIONS
from xenlab.errors import ConfigError
from xenlab.paths import BACKPORTS_INSTALL, DEFAULT_CONFIG, QEMU_STACKS, backports_qemu

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
ACCELS = ("auto", "kvm", "tcg")
CPUS = ("qemu64", "svm", "max")  # svm: qemu64 with AMD-V and nested paging, for HVM/PVH guests
SUITES = tuple(XEN_VERSIONS)  # Debian suites a dom0 image can be built from


def parse_mib(value: Any, key: str) -> int:
    """'2048M', '2G', '512' (MiB) or an int -> MiB."""
    if isinstance(value, int) and not isinstance(value, bool):
        mib = value
    elif isinstance(value, str) and (m := re.fullmatch(r"\s*(\d+)\s*([MmGg]?)(?:i?[Bb])?\s*", value)):
        mib = int(m.group(1)) * (1024 if m.group(2).lower() == "g" else 1)
    else:
        raise ConfigError(f"{key}: cannot read {value!r} as a size", "write it like 2048M or 2G")
    if mib <= 0:
        raise ConfigError(f"{key}: size must be positive, got {value!r}", "write it like 2048M or 2G")
    return mib


def validate_name(name: str, what: str = "lab name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(
            f"invalid {what} {name!r}",
            "use 1-32 characters: lowercase letters, digits, '-' or '_', starting with a letter or digit",
        )
    return name


@dataclass(frozen=True)
class Dom0Config:
    suite: str = "bookworm"
    memory: int = 1024  # MiB
    vcpus: int = 2
    disk_size: int = 2048  # MiB
    extra_packages: tuple[str, ...] = ()
    kernel_args: str = ""  # appended to dom0's kernel command line
    kernel: str = ""  # a dom0 kernel of the user's (bzImage or vmlinux); "": the image's
    modules: str = ""  # with `kernel`: its modules_install tree


@dataclass(frozen=True)
class LabConfig:
    name: str = "default"
    connect: str = ""
    accel: str = "auto"
    memory: int = 2048  # MiB
    vcpus: int = 2
    cpu: str = "svm"
    ssh_port: int = 0
    boot_timeout: float = 240.0
    xen_args: str = ""  # appended to Xen's command line
    xen: str = ""  # a Xen of the user's (xen.gz or xen); "": the image's
    qemu: str = ""  # "stock", "backports", or a qemu-system-x86_64's path; "": backports when installed, else stock
    snapshots: bool = True  # save a booted lab once and restore it instead of booting cold
    dom0: Dom0Config = field(default_factory=Dom0Config)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def differences(self, running: LabConfig) -> list[str]:
        """What this configuration asks that the lab `running` was not
        started with, as "key: running value -> asked value" (settings that
        only matter while booting, such as its timeout, left out)."""
        def flat(cfg: LabConfig) -> dict:
            whole = cfg.to_dict()
            out = {k: v for k, v in whole.items() if k not in ("dom0", *BOOT_ONLY)}
            out.update({f"dom0.{k}": v for k, v in whole["dom0"].items()})
            return out
        mine, theirs = flat(self), flat(running)
        return [f"{k}: {theirs.get(k)!r} -> {v!r}" for k, v in mine.items() if theirs.get(k) != v]

    @classmethod
    def from_dict(cls, data: dict) -> LabConfig:
        """The inverse of to_dict (e.g. the config a running lab was started with, from its lab.json)."""
        known = {f.name for f in fields(cls)}
        dom0_known = {f.name for f in fields(Dom0Config)}
        dom0: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.get("dom0", {}).items() if k in dom0_known}
        return _check(cls(dom0=Dom0Config(**dom0), **{k: v for k, v in data.items() if k in known and k != "dom0"}))


SIZE_KEYS = {"memory", "disk_size"}
BOOT_ONLY = ("boot_timeout", "snapshots")  # how a lab boots, not what runs


def _coerce(section: str, cls: type, raw: dict) -> dict:
    known = {f.name: f for f in fields(cls) if f.name != "dom0"}
    out = {}
    for key, value in raw.items():
        where = f"[{section}] {key}"
        if key not in known:
            raise ConfigError(
                f"unknown config key {where}", f"known keys in [{section}]: {', '.join(sorted(known))}"
            )
        kind = known[key].type
        if key in SIZE_KEYS:
            value = parse_mib(value, where)
        elif kind == "bool":
            if not isinstance(value, bool):
                raise ConfigError(f"{where} must be true or false, got {value!r}")
        elif kind == "int":
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{where} must be an integer, got {value!r}")
        elif kind == "float":
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"{where} must be a number, got {value!r}")
            value = float(value)
        elif kind == "str":
            if not isinstance(value, str):
                raise ConfigError(f"{where} must be a string, got {value!r}")
        elif kind.startswith("tuple"):
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where} must be a list of strings, got {value!r}")
            value = tuple(value)
        out[key] = value
    return out


def _check(cfg: LabConfig) -> LabConfig:
    validate_name(cfg.name)
    if cfg.accel not in ACCELS:
        raise ConfigError(f"[lab] accel must be one of {', '.join(ACCELS)}, got {cfg.accel!r}")
    if cfg.cpu not in CPUS:
        raise ConfigError(f"[lab] cpu must be one of {', '.join(CPUS)}, got {cfg.cpu!r}")
    if cfg.dom0.suite not in SUITES:
        raise ConfigError(f"[dom0] suite {cfg.dom0.suite!r} is not supported", f"supported: {', '.join(SUITES)}")
    if not 0 <= cfg.ssh_port <= 65535:
        raise ConfigError(f"[lab] ssh_port must be 0..65535, got {cfg.ssh_port}")
    if not 1 <= cfg.vcpus <= 64 or not 1 <= cfg.dom0.vcpus <= cfg.vcpus:
        raise ConfigError(
            f"vcpus: lab {cfg.vcpus}, dom0 {cfg.dom0.vcpus}", "need 1 <= dom0 vcpus <= lab vcpus <= 64"
        )
    if cfg.memory < 512:
        raise ConfigError(f"[lab] memory {cfg.memory}M is too small", "give the lab at least 512M")
    if not 256 <= cfg.dom0.memory <= cfg.memory - 128:
        raise ConfigError(
            f"[dom0] memory {cfg.dom0.memory}M does not fit in lab memory {cfg.memory}M",
            "dom0 needs at least 256M and Xen about 128M of the lab's memory for itself",
        )
    if cfg.dom0.disk_size < 1024:
        raise ConfigError(f"[dom0] disk_size {cfg.dom0.disk_size}M is too small", "use at least 1024M")
    if cfg.boot_timeout <= 0:
        raise ConfigError(f"[lab] boot_timeout must be positive, got {cfg.boot_timeout}")
    if cfg.qemu == "backports" and not backports_qemu():
        raise ConfigError("[lab] qemu \"backports\": the QEMU from bookworm-backports is not installed",
                          f"install it with {BACKPORTS_INSTALL}, or use qemu = \"stock\"")
    if cfg.qemu and cfg.qemu not in QEMU_STACKS and not (Path(cfg.qemu).is_file() and os.access(cfg.qemu, os.X_OK)):
        raise ConfigError(f"[lab] qemu {cfg.qemu!r} is not an executable file",
                          "give \"stock\" (Debian's QEMU), \"backports\" (docs/versions.md), the path of a "
                          "qemu-system-x86_64, or \"\" for the default")
    if cfg.connect and "://" not in cfg.connect:
        raise ConfigError(
            f"bad libvirt URI {cfg.connect!r}", "write a URI such as qemu:///system or qemu+ssh://host/system"
        )
    return cfg


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def load(path: Path | None = None, overrides: dict | None = None) -> LabConfig:
    """Defaults <- TOML file <- overrides ({'name': ..., 'dom0.memory': ...}); validated."""
    lab_raw: dict = {}
    dom0_raw: dict = {}
    dom0_vcpus_given = False
    for source in [DEFAULT_CONFIG] + ([path] if path else []):
        data = _read_toml(Path(source))
        for section, value in data.items():
            if section not in ("lab", "dom0"):
                raise ConfigError(f"unknown config section [{section}] in {source}", "sections are [lab] and [dom0]")
            (lab_raw if section == "lab" else dom0_raw).update(value)
            dom0_vcpus_given |= source != DEFAULT_CONFIG and section == "dom0" and "vcpus" in value
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key.startswith("dom0."):
            dom0_raw[key.removeprefix("dom0.")] = value
            dom0_vcpus_given |= key == "dom0.vcpus"
        else:
            lab_raw[key] = value
    dom0 = Dom0Config(**_coerce("dom0", Dom0Config, dom0_raw))
    cfg = LabConfig(dom0=dom0, **_coerce("lab", LabConfig, lab_raw))
    if not dom0_vcpus_given and 1 <= cfg.vcpus < dom0.vcpus:
        cfg = replace(cfg, dom0=replace(dom0, vcpus=cfg.vcpus))  # `--vcpus 1` alone means a 1-vCPU lab, dom0 included
    return _check(cfg)
