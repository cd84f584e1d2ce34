#!/usr/bin/env bash
# The whole test suite: host set-up (idempotent), the wheel check, the dom0 image and the guest
# kernel and roots (cached; the first guest kernel build takes ~4 min), unit
# tests, then the e2e tests on the real lab (Xen under QEMU; TCG here) on the
# stock QEMU, then `xenlab verify` on the backports QEMU (docs/versions.md),
# then the lab and guest e2e tests and verify again as an ordinary user.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup-host.sh
venv=${XENLAB_VENV:-.venv}
# The wheel as users install it, run from outside the checkout.
bash ci/wheel-check.sh
"$venv/bin/xenlab" build
"$venv/bin/xenlab" guest build
"$venv/bin/python" -m pytest tests -v -p no:cacheprovider "$@"
# The other stack (docs/versions.md): QEMU from bookworm-backports beside the
# stock one, checked end to end by `xenlab verify`; its reports are kept.
qemu=$(bash ci/qemu-backports.sh)
reports=${XENLAB_REPORTS:-artifacts}
mkdir -p "$reports"
other_config="$reports/qemu-backports.toml"
printf '[lab]\nqemu = "%s"\n' "$qemu" >"$other_config"
"$venv/bin/xenlab" --config "$other_config" verify --lab ci-qemu-backports --down \
  --json "$reports/verify-qemu-backports.json" --junit "$reports/verify-qemu-backports.xml"
# Without root (docs/reliability.md#running-as-an-ordinary-user).
XENLAB_REPORTS=$(cd "$reports" && pwd) bash ci/as-user.sh
