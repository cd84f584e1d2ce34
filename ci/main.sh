#!/usr/bin/env bash
# The main job: set the host up, build the dom0 image and the guest kernel and
# roots (all cached), then `xenlab verify`: it boots the lab, starts a domU,
# runs every check, prints the report and writes JSON and JUnit XML
# (artifacts/verify.{json,xml}); its exit code is the job's. The lab is
# stopped at the end unless XENLAB_KEEP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${XENLAB_REAPED:-}" ] || bash ci/setup-host.sh
. ci/reaped.sh "$PWD/ci/main.sh" "$@"
venv=${XENLAB_VENV:-.venv}
name=${XENLAB_NAME:-main}
reports=${XENLAB_REPORTS:-artifacts}
x() { "$venv/bin/xenlab" "$@"; }
# XENLAB_KEEP=1 leaves the lab running for `xenlab ssh --lab main`.
[ "${XENLAB_KEEP:-0}" = 1 ] || trap 'x down --lab "$name" >/dev/null 2>&1 || true' EXIT
x build
x guest build
mkdir -p "$reports"
x verify --lab "$name" --json "$reports/verify.json" --junit "$reports/verify.xml"
