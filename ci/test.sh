#!/usr/bin/env bash
# The whole test suite: unit tests, then the e2e tests on the real lab (Xen
# under QEMU, TCG here). Builds the dom0 image first if it is not cached.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${XENLAB_VENV:-.venv}
"$venv/bin/xenlab" build
"$venv/bin/python" -m pytest tests -v -p no:cacheprovider "$@"
