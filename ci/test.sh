#!/usr/bin/env bash
# The whole test suite: host set-up (idempotent), the wheel check, the dom0 image and the guest
# kernel and roots (cached; the first guest kernel build takes ~4 min), unit
# tests, then the e2e tests on the real lab (Xen under QEMU; TCG here).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup-host.sh
venv=${XENLAB_VENV:-.venv}
# The wheel as users install it, run from outside the checkout.
bash ci/wheel-check.sh
"$venv/bin/xenlab" build
"$venv/bin/xenlab" guest build
"$venv/bin/python" -m pytest tests -v -p no:cacheprovider "$@"
