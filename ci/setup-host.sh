#!/usr/bin/env bash
# Host set-up for xenlab on Debian 12: Debian packages, then a venv with the
# package installed (editable). Idempotent: when everything is present it only
# checks, which takes about a second.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${XENLAB_VENV:-$repo/.venv}

packages=(
  qemu-system-x86 qemu-utils
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-dev pkg-config
  mmdebstrap e2fsprogs cpio busybox-static kmod zstd
  linux-source-6.1 bc bison flex libelf-dev libssl-dev build-essential
  openssh-client python3-venv python3-dev uidmap gdb tini
  libwrap0  # the unpacked sshd below (test_remote's stand-in host) links it
  chromium
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  "${sudo_cmd[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# QEMU 10 from bookworm-backports beside Debian's 7.2, for every user: labs
# run it by default (faster, and without 7.2's TCG #GP bug; docs/versions.md).
# When it cannot be had, the stock QEMU stays and labs run on that.
if ! "${sudo_cmd[@]}" bash "$repo/ci/qemu-backports.sh" >/dev/null; then
  echo "setup: keeping Debian's QEMU 7.2; \`xenlab doctor\` says what that changes" >&2
fi

# libvirt's QEMU driver resolves its compiled-in default user even when embedded
# (and our qemu.conf then runs QEMU as the caller); libvirt-daemon-system would
# create it but also installs and starts system daemons we do not need.
if ! getent group libvirt-qemu >/dev/null; then "${sudo_cmd[@]}" groupadd --system libvirt-qemu; fi
if ! getent passwd libvirt-qemu >/dev/null; then
  "${sudo_cmd[@]}" useradd --system --no-create-home --shell /usr/sbin/nologin -g libvirt-qemu libvirt-qemu
fi

# sshd for the e2e tests' stand-in remote libvirt host (tests/e2e/test_remote.py),
# unpacked only: installing openssh-server would start an SSH service here.
openssh=/opt/xenlab/stacks/openssh
if [ ! -x "$openssh/usr/sbin/sshd" ]; then
  debs=$(mktemp -d)
  (cd "$debs" && apt-get download -q openssh-server >/dev/null 2>&1)
  "${sudo_cmd[@]}" mkdir -p "$openssh"
  "${sudo_cmd[@]}" dpkg-deb -x "$debs"/openssh-server_*.deb "$openssh"
  rm -rf "$debs"
fi

# An ordinary user builds the dom0 image in a user namespace, which maps the
# image's owners (root, _apt, ...) to the user's subordinate ids.
user=${SUDO_USER:-$(id -un)}
if [ "$user" != root ]; then
  for table in /etc/subuid /etc/subgid; do
    if ! grep -q "^$user:" "$table" 2>/dev/null; then
      start=$(awk -F: '{ end = $2 + $3; if (end > top) top = end } END { print (top > 100000 ? top : 100000) }' "$table" 2>/dev/null || echo 100000)
      flag=--add-subuids; [ "$table" = /etc/subgid ] && flag=--add-subgids
      "${sudo_cmd[@]}" usermod "$flag" "$start-$((start + 65535))" "$user"
    fi
  done
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating venv $venv"
  /usr/bin/python3 -m venv "$venv"
fi
stamp="$venv/.xenlab-installed"
if [ ! -f "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ]; then
  echo "setup: installing xenlab into $venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -e "$repo[test]"
  touch "$stamp"
fi
echo "setup: ready ($venv/bin/xenlab)"
