"""A lab on a remote libvirt host against one here, side by side in one run,
on the stand-in remote host of ci/standin_host.py (same machine, another
account, reached over SSH on loopback; needs root):

- `up`: here (snapshots off, so a cold boot), there with the image's volumes
  to upload first, there again with them in place;
- what moves over the wire on the first remote `up` (volume sizes);
- one command in dom0 (`xenlab ssh -- true`, a new process and connection),
  and `guest create` + `destroy`, here and there.

Prints one JSON document. Usage: .venv/bin/python bench/remote_bench.py [--runs N]"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "ci"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import standin_host  # noqa: E402
from lab_bench import host, summary  # noqa: E402

XENLAB = [sys.executable, "-m", "xenlab"]


def timed(*args: str) -> tuple[float, str]:
    start = time.monotonic()
    proc = subprocess.run(XENLAB + list(args), capture_output=True, text=True)
    took = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"xenlab {' '.join(args)} failed:\n{proc.stderr}")
    return took, proc.stdout


def pool_volumes(uri: str) -> dict[str, int]:
    import libvirt

    libvirt.virEventRegisterDefaultImpl()
    conn = libvirt.open(uri)
    try:
        try:
            pool = conn.storagePoolLookupByName("xenlab")
        except libvirt.libvirtError:
            return {}
        pool.refresh(0)
        return {v.name(): v.info()[2] for v in pool.listAllVolumes()}  # bytes on disk (a qcow2's capacity is its virtual size)
    finally:
        conn.close()


def drop_pool(uri: str) -> None:
    """Remove xenlab's pool and its volumes there: the next remote `up` uploads everything."""
    import libvirt

    libvirt.virEventRegisterDefaultImpl()
    conn = libvirt.open(uri)
    try:
        pool = conn.storagePoolLookupByName("xenlab")
        for vol in pool.listAllVolumes():
            vol.delete(0)
        pool.destroy()
        pool.undefine()
    except libvirt.libvirtError:
        pass
    finally:
        conn.close()


def lab_figures(lab: str, runs: int) -> dict:
    commands, creates = [], []
    for n in range(runs):
        took, _ = timed("ssh", "--lab", lab, "--", "true")
        commands.append(took)
        took, _ = timed("guest", "create", "--lab", lab, f"rb{n}", "--disk", "8M")
        creates.append(took)
        timed("guest", "destroy", "--lab", lab, f"rb{n}")
    return {"ssh_true_seconds": summary(commands), "guest_create_seconds": summary(creates)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="xenlab-remote-bench-"))
    uri, sshd = standin_host.start(work)
    local, remote = "bench-here", "bench-there"
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write("[lab]\nsnapshots = false\n")
        no_snapshots = f.name
    result: dict = {"benchmark": "remote", "host": host(), "remote": "ci/standin_host.py: this machine, account xenlab-remote, SSH on loopback"}
    try:
        drop_pool(uri)
        ups = {"here_cold": [], "there_first": [], "there_cached": []}
        took, _ = timed("--config", no_snapshots, "up", "--lab", local)
        ups["here_cold"].append(took)
        result["here"] = lab_figures(local, args.runs)
        timed("down", "--lab", local)
        took, out = timed("up", "--lab", remote, "--connect", uri, "--json")
        ups["there_first"].append(took)
        result["there_first_up_steps_seconds"] = {step: round(t, 2) for step, t in json.loads(out)["timings"].items()}
        sent = pool_volumes(uri)
        result["uploaded_on_first_up_mib"] = {name: round(size / 2**20, 1) for name, size in sent.items() if not name.startswith("lab-")}
        result["there"] = lab_figures(remote, args.runs)
        timed("down", "--lab", remote)
        for _ in range(args.runs - 1):
            took, _ = timed("--config", no_snapshots, "up", "--lab", local)
            ups["here_cold"].append(took)
            timed("down", "--lab", local)
            took, _ = timed("up", "--lab", remote, "--connect", uri)
            ups["there_cached"].append(took)
            timed("down", "--lab", remote)
        result["up_seconds"] = {k: summary(v) for k, v in ups.items() if v}
        here = statistics.median(ups["here_cold"])
        if ups["there_cached"]:
            result["ratio_remote_cached_up_to_local_cold_up"] = round(statistics.median(ups["there_cached"]) / here, 2)
        result["ratio_remote_first_up_to_local_cold_up"] = round(ups["there_first"][0] / here, 2)
    finally:
        for lab in (local, remote):
            subprocess.run(XENLAB + ["down", "--lab", lab], capture_output=True)
        standin_host.stop(work, sshd)
        Path(no_snapshots).unlink()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
