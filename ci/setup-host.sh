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
  mmdebstrap e2fsprogs cpio busybox-static kmod
  linux-source-6.1 bc bison flex libelf-dev libssl-dev build-essential
  openssh-client python3-venv python3-dev
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating venv $venv"
  /usr/bin/python3 -m venv "$venv"
fi
stamp="$venv/.xenlab-installed"
if [ ! -f "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ]; then
  echo "setup: installing xenlab into $venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -e "$repo"
  touch "$stamp"
fi
echo "setup: ready ($venv/bin/xenlab)"
