#!/usr/bin/env bash
# The whole test suite: host set-up (idempotent), the wheel check, the dom0 image and the guest
# kernel and roots (cached; the first guest kernel build takes ~4 min), unit
# tests, then the e2e tests on the real lab (Xen under QEMU; TCG here) on the
# default stack (QEMU 10 from bookworm-backports), then `xenlab verify` on
# Debian's QEMU 7.2 (docs/versions.md; HVM and PV guests) and, beside it, on a
# trixie dom0 (Xen 4.20, a PVH guest; docs/guest-types.md) followed by the lab
# e2e tests and verify again as an ordinary user.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${XENLAB_REAPED:-}" ] || bash ci/setup-host.sh
. ci/reaped.sh "$PWD/ci/test.sh" "$@"
venv=${XENLAB_VENV:-.venv}
# The wheel as users install it, run from outside the checkout.
bash ci/wheel-check.sh
# setup-host.sh keeps the stock QEMU when backports cannot be had; CI must not
# then run both halves on one stack: this fails with the reason instead.
bash ci/qemu-backports.sh >/dev/null
"$venv/bin/xenlab" build
"$venv/bin/xenlab" guest build
reports=${XENLAB_REPORTS:-artifacts}
mkdir -p "$reports"
# One worker: two (-n 2 --dist loadgroup, tests/e2e/conftest.py) gained
# little on two cores (docs/testing.md#two-workers). --durations: where the
# time goes; every test's time is in $reports/pytest.xml.
"$venv/bin/python" -m pytest tests -v -p no:cacheprovider --durations=40 --junitxml "$reports/pytest.xml" "$@"
# The other stack (docs/versions.md): Debian's own QEMU 7.2, checked end to
# end by `xenlab verify` with an HVM and then a PV guest on one lab (Xen 4.17
# runs HVM and PVH guests on this QEMU, not on 10: docs/guest-types.md); its
# reports are kept. One vCPU: under TCG, PVH and HVM guests need it.
other_config="$reports/qemu-stock.toml"
printf '[lab]\nqemu = "stock"\nvcpus = 1\n' >"$other_config"
# `xenlab verify` with its reports kept as $reports/verify-NAME.{json,xml};
# run once more (reports verify-NAME-again.*) only when its report says the
# lab VM stalled: a QEMU TCG stall of minutes, not a verdict on the code
# (docs/verify.md#a-stalled-lab).
verify_kept() {
  local name=$1
  shift
  "$venv/bin/xenlab" "$@" --json "$reports/verify-$name.json" --junit "$reports/verify-$name.xml" && return 0
  "$venv/bin/python" -c 'import json, sys; sys.exit(not json.load(open(sys.argv[1])).get("lab_stalled"))' \
    "$reports/verify-$name.json" 2>/dev/null || return 1
  echo "verify $name: the lab VM stalled (docs/verify.md#a-stalled-lab); running it once more" >&2
  "$venv/bin/xenlab" "$@" --json "$reports/verify-$name-again.json" --junit "$reports/verify-$name-again.xml"
}
# Beside the stock-QEMU verifies, one after the other: Debian trixie's Xen
# 4.20 with a PVH guest (its reports kept too), then the lab tests and verify
# as an ordinary user (docs/reliability.md#running-as-an-ordinary-user). Under
# TCG every vCPU is a host thread: the stock and trixie labs have one each,
# on two cores. The HVM verify goes first, so that its guest's long boot
# meets only the trixie lab; the ordinary user's lab comes later, beside
# the PV verify. This saves about 8 min; the side's output is printed when
# both are done.
trixie_config="$reports/trixie.toml"
printf '[lab]\nvcpus = 1\n[dom0]\nsuite = "trixie"\n' >"$trixie_config"
side_log="$reports/side.log"
(
  "$venv/bin/xenlab" --config "$trixie_config" build
  verify_kept trixie-pvh --config "$trixie_config" verify --lab ci-trixie --guest-type pvh --down
  XENLAB_REPORTS=$(cd "$reports" && pwd) bash ci/as-user.sh
) >"$side_log" 2>&1 &
side_pid=$!
# If the stock half fails, this script still waits for the side (its verifies
# take their labs down) and then makes sure the trixie lab is gone.
trap 'wait "$side_pid" 2>/dev/null; cat "$side_log"; "$venv/bin/xenlab" down --lab ci-trixie >/dev/null 2>&1 || true' EXIT
stock_failed=0
verify_kept qemu-stock-hvm --config "$other_config" verify --lab ci-qemu-stock --guest-type hvm || stock_failed=1
[ "$stock_failed" = 1 ] || verify_kept qemu-stock --config "$other_config" verify --lab ci-qemu-stock || stock_failed=1
"$venv/bin/xenlab" down --lab ci-qemu-stock >/dev/null
side_failed=0
wait "$side_pid" || side_failed=1
trap - EXIT
echo "--- trixie dom0 with a PVH guest, then the ordinary user (ran beside the stock-QEMU verifies; $side_log):"
cat "$side_log"
[ "$stock_failed" = 0 ] && [ "$side_failed" = 0 ]
