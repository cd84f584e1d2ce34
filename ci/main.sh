#!/usr/bin/env bash
# The main job: set the host up, build (cached), boot the lab, report, stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup-host.sh
venv=${XENLAB_VENV:-.venv}
name=${XENLAB_NAME:-main}
# XENLAB_KEEP=1 leaves the lab running for `xenlab ssh --name main`.
[ "${XENLAB_KEEP:-0}" = 1 ] || trap '"$venv/bin/xenlab" down --name "$name" >/dev/null 2>&1 || true' EXIT
"$venv/bin/xenlab" up --name "$name"
"$venv/bin/xenlab" status --name "$name"
