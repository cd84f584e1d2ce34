#!/usr/bin/env bash
# The lab e2e tests and `xenlab verify` again, as an ordinary user:
# image builds in a user namespace, the embedded libvirt driver and QEMU as
# that user (docs/reliability.md#running-as-an-ordinary-user). Run as root,
# it makes the user XENLAB_USER (default xenlab-ci), copies the checkout into
# its home (the checkout may sit where it cannot read) and runs there with a
# venv of its own; run as an ordinary user, it runs in place. The user's
# caches are its own: its first run builds the dom0 image and the guest
# kernel (minutes: docs/performance.md), later runs reuse them.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
reports=${XENLAB_REPORTS:-$repo/artifacts}
mkdir -p "$reports"
steps='
set -euo pipefail
cd "$src"
if [ ! -x "$venv/bin/python" ]; then python3 -m venv "$venv"; fi
if [ ! -f "$venv/.xenlab-installed" ] || [ pyproject.toml -nt "$venv/.xenlab-installed" ]; then
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -e .
  touch "$venv/.xenlab-installed"
fi
x() { "$venv/bin/xenlab" "$@"; }
echo "as-user: $(id -un) (uid $(id -u)), checkout $src"
x doctor --no-probe
x build
x guest build
# The lab tests and verify (which creates, checks and destroys a guest): what
# depends on who runs xenlab. test_guest.py runs as root only, for CI time.
"$venv/bin/python" -m pytest -v -p no:cacheprovider tests/e2e/test_lab.py
x verify --lab ci-user --down --json "$out/verify-user.json" --junit "$out/verify-user.xml"
'
if [ "$(id -u)" -ne 0 ]; then
  export src=$repo venv=${XENLAB_VENV:-$repo/.venv} out=$reports
  exec bash -c "$steps"
fi
user=${XENLAB_USER:-xenlab-ci}
getent passwd "$user" >/dev/null || useradd --create-home --shell /bin/bash "$user"
# Subordinate ids for the user's image builds (setup-host.sh gives them to $SUDO_USER).
SUDO_USER=$user bash "$repo/ci/setup-host.sh" >/dev/null
home=$(getent passwd "$user" | cut -d: -f6)
src=$home/checkout
out=$home/reports
rm -rf "$src" "$out"
mkdir -p "$src" "$out"
tar -C "$repo" --exclude=./.venv --exclude=./artifacts -c . | tar -C "$src" -x
chown -R "$user:" "$src" "$out"
status=0
setpriv --reuid="$user" --regid="$user" --init-groups \
  env -i HOME="$home" USER="$user" LOGNAME="$user" PATH=/usr/local/bin:/usr/bin:/bin CI="${CI:-}" TERM=dumb \
  src="$src" venv="$home/venv" out="$out" bash -c "$steps" || status=$?
cp "$out"/verify-user.* "$reports"/ 2>/dev/null || true
exit "$status"
