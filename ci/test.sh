#!/usr/bin/env bash
# The whole test suite: host set-up (idempotent), the wheel check, the dom0 image and the guest
# kernel and roots (cached; the first guest kernel build takes ~4 min), unit
# tests, then the e2e tests on the real lab (Xen under QEMU; TCG here) on the
# default stack (QEMU 10 from bookworm-backports), then `xenlab verify` on
# Debian's QEMU 7.2 (docs/versions.md; PV and HVM guests) and on a trixie dom0
# (Xen 4.20, a PVH guest; docs/guest-types.md), then the lab e2e tests and verify again as
# an ordinary user.
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
# end by `xenlab verify` with a PV and then an HVM guest on one lab (Xen 4.17
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
# Debian trixie's Xen 4.20 with a PVH guest, its reports kept too, runs
# beside the stock-QEMU verifies: both labs have one vCPU (under TCG, PVH
# and HVM guests need it), one host thread each on two cores, and this
# saves the shorter one's ~6 min. Its output is printed when both are done.
trixie_config="$reports/trixie.toml"
printf '[lab]\nvcpus = 1\n[dom0]\nsuite = "trixie"\n' >"$trixie_config"
trixie_log="$reports/trixie.log"
(
  "$venv/bin/xenlab" --config "$trixie_config" build
  verify_kept trixie-pvh --config "$trixie_config" verify --lab ci-trixie --guest-type pvh --down
) >"$trixie_log" 2>&1 &
trixie_pid=$!
# If the stock half fails, this script still waits for the trixie half (its
# verify takes its lab down) and then makes sure that lab is gone.
trap 'wait "$trixie_pid" 2>/dev/null; cat "$trixie_log"; "$venv/bin/xenlab" down --lab ci-trixie >/dev/null 2>&1 || true' EXIT
stock_failed=0
verify_kept qemu-stock --config "$other_config" verify --lab ci-qemu-stock || stock_failed=1
[ "$stock_failed" = 1 ] || verify_kept qemu-stock-hvm --config "$other_config" verify --lab ci-qemu-stock --guest-type hvm || stock_failed=1
"$venv/bin/xenlab" down --lab ci-qemu-stock >/dev/null
trixie_failed=0
wait "$trixie_pid" || trixie_failed=1
trap - EXIT
echo "--- trixie dom0, PVH guest (ran beside the stock-QEMU verifies; $trixie_log):"
cat "$trixie_log"
[ "$stock_failed" = 0 ] && [ "$trixie_failed" = 0 ]
# Without root (docs/reliability.md#running-as-an-ordinary-user).
XENLAB_REPORTS=$(cd "$reports" && pwd) bash ci/as-user.sh
