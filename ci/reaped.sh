# Sourced by the CI scripts, after setup-host.sh (which installs tini), as
# `. ci/reaped.sh "$PWD/ci/SCRIPT.sh" "$@"`: runs that script again under
# `tini -s`, a subreaper. A lab's QEMU is a daemon, and when one is killed
# (down, reset) libvirt waits until its parent reaps it; under tini that is at
# once, while a PID 1 that reaps late (this sandbox's: every ~1.25 s) adds
# that wait to every stop (docs/performance.md#snapshots-restore-and-reset).
if [ -z "${XENLAB_REAPED:-}" ]; then
  export XENLAB_REAPED=1
  exec tini -s -- bash "$@"
fi
