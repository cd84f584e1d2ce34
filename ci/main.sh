#!/usr/bin/env bash
# The main job: set the host up, build (cached), boot the lab, start a domU,
# verify its block and network rings end to end, print the report, stop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup-host.sh
venv=${XENLAB_VENV:-.venv}
name=${XENLAB_NAME:-main}
x() { "$venv/bin/xenlab" "$@"; }
# XENLAB_KEEP=1 leaves the lab (and guest "demo") running for `xenlab ssh --name main`.
[ "${XENLAB_KEEP:-0}" = 1 ] || trap 'x down --name "$name" >/dev/null 2>&1 || true' EXIT
x build
x guest build
x up --name "$name"
x guest create --lab "$name" demo --disk 64M --disk 8M:ro --net --trace
x guest check --lab "$name" demo
x guest list --lab "$name"
x status --name "$name"
