#!/usr/bin/env bash
# The package as users get it: build a wheel, install it into a fresh venv,
# and run it from a directory outside the checkout (so nothing can be found
# relative to the repository). Leaves nothing behind.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/xenlab-wheel.XXXXXX)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q --upgrade pip
"$work/venv/bin/pip" wheel -q --no-deps -w "$work/dist" "$repo"
"$work/venv/bin/pip" install -q "$work"/dist/xenlab-*.whl
cd "$work"
"$work/venv/bin/xenlab" config --json > config.json
"$work/venv/bin/python" - <<'PY'
import json, sys
cfg = json.load(open("config.json"))
assert cfg["dom0"]["suite"] == "bookworm" and cfg["name"] == "default", cfg
import xenlab
assert "site-packages" in xenlab.__file__, xenlab.__file__  # the wheel, not the checkout
from xenlab import Lab
from xenlab.build import kernel
assert kernel.fragment_path().is_file() and "site-packages" in str(kernel.fragment_path())
assert "libvirt" not in sys.modules, "importing the library must not load libvirt"
from pathlib import Path
assert (Path(xenlab.__file__).parent / "py.typed").is_file(), "the wheel must carry py.typed (PEP 561)"
print("wheel-check: config, resources and imports ok from", xenlab.__file__)
PY
"$work/venv/bin/xenlab" doctor --no-probe
echo "wheel-check: ok"
