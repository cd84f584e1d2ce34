#!/usr/bin/env bash
# The test suite (docs/testing.md): host set-up (idempotent), the wheel check,
# the dom0 images and the guest kernel and roots (cached; the first guest
# kernel build takes ~5 min), unit tests, then the e2e tests on the real lab
# (Xen under QEMU; TCG here), and beside them the steps "after pytest" (their
# old place): `xenlab verify` on Debian's QEMU 7.2 (HVM and PV guests) and on
# a trixie dom0 (Xen 4.20, a PVH guest), and the lab tests and verify again
# as an ordinary user.
#
#   bash ci/test.sh            the gate tier and one slice of the full tier, with
#                              that slice's steps after pytest (tests/tiers.py:
#                              slice = commit count % 4, or $XENLAB_SLICE)
#   bash ci/test.sh --full     both tiers whole and every step after pytest
#   bash ci/test.sh ARGS...    other arguments go to pytest (-k xenstore, ...)
#
# It ends by printing its time per phase and the share of CI's 90-minute
# limit it used, and keeps that ledger in artifacts/ledger.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export XENLAB_CI_STARTED=${XENLAB_CI_STARTED:-$(date +%s)}
if [ -z "${XENLAB_REAPED:-}" ]; then
  bash ci/setup-host.sh
  export XENLAB_CI_SETUP_SECONDS=$(($(date +%s) - XENLAB_CI_STARTED))
fi
. ci/reaped.sh "$PWD/ci/test.sh" "$@"
venv=${XENLAB_VENV:-.venv}
reports=${XENLAB_REPORTS:-artifacts}
mkdir -p "$reports"

full=0
pytest_args=()
for arg in "$@"; do
  if [ "$arg" = --full ]; then full=1; else pytest_args+=("$arg"); fi
done
if [ "$full" = 1 ]; then
  mode="full: both tiers whole, every step after pytest"
  steps="qemu-stock-hvm qemu-stock-pv trixie-pvh as-user"
  slice_args=()
else
  slice=${XENLAB_SLICE:-$("$venv/bin/python" tests/tiers.py slice)}
  mode="gate + $("$venv/bin/python" tests/tiers.py plan "$slice")"
  steps=$("$venv/bin/python" tests/tiers.py steps "$slice")
  slice_args=(--slice "$slice")
fi
echo "ci/test.sh: $mode"

# The ledger: one line per phase (name, seconds, exit code), kept even when a
# phase fails; the steps run beside each other append from their subshells.
ledger_lines="$reports/ledger.lines"
: >"$ledger_lines"
[ -z "${XENLAB_CI_SETUP_SECONDS:-}" ] || printf 'setup-host\t%s\t0\n' "$XENLAB_CI_SETUP_SECONDS" >>"$ledger_lines"
phase() {
  local name=$1 t0 rc=0
  shift
  t0=$(date +%s)
  "$@" || rc=$?
  printf '%s\t%s\t%s\n' "$name" "$(($(date +%s) - t0))" "$rc" >>"$ledger_lines"
  return "$rc"
}
ledger() {
  "$venv/bin/python" ci/ledger.py "$ledger_lines" "$reports/ledger.json" --started "$XENLAB_CI_STARTED" --mode "$mode" || true
}
trap ledger EXIT

# The wheel as users install it, run from outside the checkout.
phase wheel-check bash ci/wheel-check.sh
# The linter and the type checker over the library (pyproject.toml [tool.ruff], [tool.mypy]).
phase lint bash -c "'$venv/bin/ruff' check xenlab && '$venv/bin/mypy' xenlab"
# setup-host.sh keeps the stock QEMU when backports cannot be had; CI must not
# then run both halves on one stack: this fails with the reason instead.
phase qemu-backports bash ci/qemu-backports.sh >/dev/null
phase builds bash -c "'$venv/bin/xenlab' build && '$venv/bin/xenlab' build --suite trixie && '$venv/bin/xenlab' guest build"
has_step() { [[ " $steps " == *" $1 "* ]]; }
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
# The other stack (docs/versions.md): Debian's own QEMU 7.2, checked end to
# end by `xenlab verify` with an HVM and then a PV guest on one lab (Xen 4.17
# runs HVM and PVH guests on this QEMU, not on 10: docs/guest-types.md). One
# vCPU: under TCG, PVH and HVM guests need it.
qemu_stock_config="$reports/qemu-stock.toml"
printf '[lab]\nqemu = "stock"\nvcpus = 1\n' >"$qemu_stock_config"
qemu_stock_hvm() {
  phase verify-qemu-stock-hvm verify_kept qemu-stock-hvm --config "$qemu_stock_config" verify --lab ci-qemu-stock --guest-type hvm
}
qemu_stock_pv() {
  phase verify-qemu-stock-pv verify_kept qemu-stock --config "$qemu_stock_config" verify --lab ci-qemu-stock
}
# Debian trixie's Xen 4.20 with a PVH guest.
trixie_pvh() {
  local config="$reports/trixie.toml"
  printf '[lab]\nvcpus = 1\n[dom0]\nsuite = "trixie"\n' >"$config"
  phase verify-trixie-pvh verify_kept trixie-pvh --config "$config" verify --lab ci-trixie --guest-type pvh --down
}
# The lab tests and verify as an ordinary user (docs/reliability.md#running-as-an-ordinary-user).
as_user() {
  phase as-user env XENLAB_REPORTS="$(cd "$reports" && pwd)" bash ci/as-user.sh
}

# The steps after pytest run beside it, started first and niced (10): its lab
# has two vCPUs but keeps about 1.2 of the two cores busy on average, and the
# steps' labs have one vCPU each, so they take what pytest leaves idle; at
# nice 5 they took a quarter of a core from pytest's busiest module (not 19:
# the labs' own toolstack timeouts run on host time)
# (docs/testing.md#the-steps-beside-pytest). In order: the stock-QEMU HVM
# verify first (its guest's boot is the longest), then the PV verify on the
# same lab, the trixie PVH verify, and the ordinary user. Their output is
# printed once pytest and they are done; a failed pytest still waits for
# them, so their labs are down when this script ends.
side_log="$reports/side.log"
side_steps() {
  renice -n 10 -p "$BASHPID" >/dev/null
  local failed=0
  if has_step qemu-stock-hvm || has_step qemu-stock-pv; then
    if has_step qemu-stock-hvm; then qemu_stock_hvm || failed=1; fi
    if [ "$failed" = 0 ] && has_step qemu-stock-pv; then qemu_stock_pv || failed=1; fi
    "$venv/bin/xenlab" down --lab ci-qemu-stock >/dev/null || failed=1
  fi
  if has_step trixie-pvh; then trixie_pvh || failed=1; fi
  if has_step as-user; then as_user || failed=1; fi
  return "$failed"
}
side_steps >"$side_log" 2>&1 &
side_pid=$!
side_done() {
  local rc=0
  wait "$side_pid" || rc=$?
  if [ -n "$steps" ]; then
    echo "--- the steps after pytest, run beside it ($steps; $side_log):"
    cat "$side_log"
  fi
  return "$rc"
}
trap 'side_done || true; "$venv/bin/xenlab" down --lab ci-qemu-stock >/dev/null 2>&1 || true; "$venv/bin/xenlab" down --lab ci-trixie >/dev/null 2>&1 || true; ledger' EXIT

# One worker: two (-n 2 --dist loadgroup, tests/e2e/conftest.py) gained
# little on two cores (docs/testing.md#two-workers). --durations: where the
# time goes; every test's time is in $reports/pytest.xml, and a failed e2e
# test's lab logs in $reports/xenlab-artifacts/ (the plugin's).
pytest_rc=0
phase pytest "$venv/bin/python" -m pytest tests -v -p no:cacheprovider --durations=40 --junitxml "$reports/pytest.xml" \
  --xenlab-artifacts "$reports/xenlab-artifacts" \
  ${slice_args[@]+"${slice_args[@]}"} ${pytest_args[@]+"${pytest_args[@]}"} || pytest_rc=$?
side_rc=0
side_done || side_rc=$?
trap ledger EXIT
[ "$pytest_rc" = 0 ] && [ "$side_rc" = 0 ]
