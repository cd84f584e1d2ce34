"""Which of libvirt's QEMU capability probes a lab ends: a stand-in probe is a
real process whose command line names its qmp directory, as libvirt's does."""
import subprocess
import sys
import time

from xenlab.config import LabConfig
from xenlab.lab.core import Lab


def start_probe(lab: Lab, tag: str) -> tuple[subprocess.Popen, object]:
    qmp = lab.embed_root / "lib" / "qemu" / f"qmp-{tag}"
    qmp.mkdir(parents=True)
    probe = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(qmp)])
    (qmp / "qmp.pid").write_text(f"{probe.pid}\n")
    return probe, qmp


def test_an_interrupted_start_ends_the_probe_it_began_and_no_other(tmp_path, monkeypatch):
    monkeypatch.setenv("XENLAB_STATE", str(tmp_path / "state"))
    lab = Lab(LabConfig(name="probes"))
    before, before_dir = start_probe(lab, "before")
    time.sleep(2.5)  # process start times have a clock tick's grain, and 1 s of slack
    began = time.time()
    ours, ours_dir = start_probe(lab, "ours")
    try:
        lab._end_stray_probes()  # both are young: another process may be probing
        assert before.poll() is None and ours.poll() is None
        lab._end_stray_probes(started_after=began)
        assert ours.wait(timeout=10) != 0 and not ours_dir.exists()
        assert before.poll() is None and before_dir.exists()  # started before this start: not ours
    finally:
        for probe in (before, ours):
            probe.kill()
            probe.wait()
