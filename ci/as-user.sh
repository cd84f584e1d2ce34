#!/usr/bin/env bash
# The e2e lab tests and `xenlab verify` again, as an ordinary user: image
# builds in a user namespace, the embedded libvirt driver and QEMU as that
# user (docs/reliability.md#running-as-an-ordinary-user). Run as root, it
# makes the user XENLAB_USER (default xenlab-ci) and runs as it; run as an
# ordinary user, it runs as that user. Its caches are its own (the first run
# builds the dom0 image and the guest kernel, ~8 min; later runs reuse them).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${XENLAB_VENV:-$repo/.venv}
reports=${XENLAB_REPORTS:-$repo/artifacts}
mkdir -p "$reports"
steps=$(cat <<STEPS
set -euo pipefail
cd "$repo"
"$venv/bin/xenlab" doctor --no-probe
"$venv/bin/xenlab" build
"$venv/bin/xenlab" guest build
"$venv/bin/python" -m pytest -v -p no:cacheprovider tests/e2e/test_lab.py tests/e2e/test_guest.py
"$venv/bin/xenlab" verify --lab ci-user --down --json "$reports/verify-user.json" --junit "$reports/verify-user.xml"
STEPS
)
if [ "$(id -u)" -ne 0 ]; then
  exec bash -c "$steps"
fi
user=${XENLAB_USER:-xenlab-ci}
getent passwd "$user" >/dev/null || useradd --create-home --shell /bin/bash "$user"
# ci/setup-host.sh gives the user subordinate ids when it runs as that user (with sudo).
SUDO_USER=$user bash "$repo/ci/setup-host.sh" >/dev/null
chown "$user" "$reports"
home=$(getent passwd "$user" | cut -d: -f6)
# The checkout and its venv are read, never written, by the user.
exec setpriv --reuid="$user" --regid="$user" --init-groups \
  env -i HOME="$home" USER="$user" LOGNAME="$user" PATH=/usr/local/bin:/usr/bin:/bin CI="${CI:-}" TERM=dumb \
  bash -c "$steps"
