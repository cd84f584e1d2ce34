"""Code that runs INSIDE the lab: in dom0 (copied over SSH by
xenlab.deploy) and in domUs (baked into the python guest root).

Standard library only (Python 3.11, as in Debian bookworm), and only relative
imports, so the package works both as `xenlab.agent` on the host (unit
tests) and as `xenlab_agent` inside the lab."""
