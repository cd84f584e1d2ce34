#!/usr/bin/env bash
# QEMU from Debian's bookworm-backports, unpacked beside the stock QEMU (which
# stays installed, selectable as `[lab] qemu = "stock"`): prints the path of
# its qemu-system-x86_64, which labs then run by default. As root it goes to
# /opt/xenlab/stacks (ci/setup-host.sh does this), for every user; otherwise to
# the user's xenlab cache. That path is a wrapper: the unpacked QEMU must load its own modules and firmware,
# not the stock QEMU's (a 7.2 module loaded into 10.0 crashes it when libvirt
# probes it), and libvirt runs emulators with a cleared environment.
#
# Debian 12's QEMU 7.2 has a TCG bug that changes what Xen sees (QEMU issue
# 1382, fixed in 8.0; see docs/versions.md). The backports suite is reached
# through the host's own apt sources (the suite name changed, nothing else),
# into a private apt state: the host's apt configuration is not touched.
# Idempotent; on any failure nothing is left and the stock QEMU is kept.
set -euo pipefail

# Where it goes: one of xenlab.paths.stack_dirs().
stacks=${XENLAB_STACKS:-${XENLAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/xenlab}/stacks}
[ -n "${XENLAB_STACKS:-}" ] || [ "$(id -u)" -ne 0 ] || stacks=/opt/xenlab/stacks
dest=$stacks/qemu-backports
binary=$dest/qemu-system-x86_64
if [ -x "$binary" ] && "$binary" --version >/dev/null 2>&1; then
  echo "$binary"
  exit 0
fi

sources=${XENLAB_APT_SOURCES:-/etc/apt/sources.list.d/debian.sources}
[ -f "$sources" ] || { echo "qemu-backports: no apt sources at $sources (set XENLAB_APT_SOURCES to a deb822 .sources file)" >&2; exit 1; }
mkdir -p "$stacks"
work=$(mktemp -d "$stacks/.qemu-backports.XXXXXX")
trap 'rm -rf "$work"' EXIT

# The host's stanza for the release itself, with the suite renamed.
python3 - "$sources" "$work/backports.sources" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
stanzas = [s for s in re.split(r"\n\s*\n", text) if re.search(r"^Suites:.*\bbookworm(\s|$)", s, re.M)]
if not stanzas:
    sys.exit(f"qemu-backports: no stanza for the bookworm suite in {sys.argv[1]}")
open(sys.argv[2], "w").write(re.sub(r"^Suites:.*$", "Suites: bookworm-backports", stanzas[0], flags=re.M) + "\n")
EOF

mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/debs" "$work/root"
apt_opts=(-q -o "Dir::Etc::SourceList=$work/backports.sources" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o APT::Sandbox::User=root)
if ! apt-get "${apt_opts[@]}" update >"$work/apt.log" 2>&1; then
  echo "qemu-backports: cannot reach bookworm-backports through the host's apt sources; the stock QEMU stays" >&2
  tail -5 "$work/apt.log" >&2
  exit 1
fi
(cd "$work/debs" && apt-get "${apt_opts[@]}" download \
  qemu-system-x86/bookworm-backports qemu-system-common/bookworm-backports \
  qemu-system-data/bookworm-backports seabios/bookworm-backports >>"$work/apt.log" 2>&1) || {
  echo "qemu-backports: downloading the backports QEMU failed; the stock QEMU stays" >&2
  tail -5 "$work/apt.log" >&2
  exit 1
}
for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$work/root"; done
# QEMU looks for each module in QEMU_MODULE_DIR, then in the stock QEMU's
# directory: an empty file here for every stock module this build lacks makes
# its load fail cleanly instead of loading a foreign build (an abort). Made
# now, and again by the wrapper (where it may write) for modules a later
# stock QEMU brings.
mods=$work/root/usr/lib/x86_64-linux-gnu/qemu
for stock in /usr/lib/x86_64-linux-gnu/qemu/*.so; do
  [ -e "$stock" ] && [ ! -e "$mods/${stock##*/}" ] && : > "$mods/${stock##*/}"
done
cat >"$work/root/qemu-system-x86_64" <<WRAPPER
#!/bin/sh
# The QEMU unpacked here, with its own modules and firmware.
mods=$dest/usr/lib/x86_64-linux-gnu/qemu
for stock in /usr/lib/x86_64-linux-gnu/qemu/*.so; do
  [ -e "\$stock" ] && [ ! -e "\$mods/\${stock##*/}" ] && : 2>/dev/null > "\$mods/\${stock##*/}"
done
QEMU_MODULE_DIR=\$mods exec $dest/usr/bin/qemu-system-x86_64 -L $dest/usr/share/qemu "\$@"
WRAPPER
chmod 755 "$work/root/qemu-system-x86_64"
# Its libraries are the host's (the stock QEMU's dependencies cover them): check it runs.
if ! version=$(QEMU_MODULE_DIR="$work/root/usr/lib/x86_64-linux-gnu/qemu" "$work/root/usr/bin/qemu-system-x86_64" --version 2>&1 | head -1); then
  echo "qemu-backports: the backports QEMU does not run on this host: $version; the stock QEMU stays" >&2
  exit 1
fi
rm -rf "$dest"
chmod 755 "$work/root"
mv "$work/root" "$dest"
echo "qemu-backports: $version in $dest" >&2
echo "$binary"
