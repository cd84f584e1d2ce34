"""A stand-in remote libvirt host on this machine, for tests and benchmarks of
remote labs: an sshd of its own on 127.0.0.1 and a second account,
`xenlab-remote`, whose libvirt session daemon (started by libvirt over SSH)
runs the lab's QEMU as that user, in its own home. That user cannot read
/root, where the caller's images and state live, so nothing works through
shared local paths. Needs root; sshd comes unpacked from Debian's
openssh-server by ci/setup-host.sh (never installed as a service).

  python3 ci/standin_host.py start DIR   # prints the URI; DIR holds keys, config, log
  python3 ci/standin_host.py stop DIR"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REMOTE_USER = "xenlab-remote"
SSHD = "/opt/xenlab/stacks/openssh/usr/sbin/sshd"


class StandInError(Exception):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _account() -> pwd.struct_passwd:
    if subprocess.run(["id", REMOTE_USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "-m", "-s", "/bin/sh", REMOTE_USER], check=True)
    subprocess.run(["usermod", "-p", "*", REMOTE_USER], check=True)  # no password, not locked: key logins work
    if subprocess.run(["id", "sshd"], capture_output=True).returncode != 0:
        # sshd's privilege separation user, which the package would have made.
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/run/sshd", "--shell", "/usr/sbin/nologin", "sshd"],
                       check=True)
    return pwd.getpwnam(REMOTE_USER)


def start(d: Path, session_path: str = "") -> tuple[str, subprocess.Popen]:
    """Start the stand-in host's sshd; its libvirt URI and the sshd process (stop() ends both).
    `session_path`: the PATH its sessions get (and so the libvirt session daemon they start)."""
    if os.geteuid() != 0:
        raise StandInError("the stand-in remote host needs root to make its account and run its sshd")
    if not Path(SSHD).exists():
        raise StandInError(f"{SSHD} is missing (ci/setup-host.sh unpacks it from Debian's openssh-server)")
    account = _account()
    d.mkdir(parents=True, exist_ok=True)
    for key in ("host_key", "client_key"):
        if not (d / key).exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    ssh_dir = Path(account.pw_dir) / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text((d / "client_key.pub").read_text())
    for path in (ssh_dir, ssh_dir / "authorized_keys"):
        os.chown(path, account.pw_uid, account.pw_gid)
    port = _free_port()
    (d / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nAllowUsers {REMOTE_USER}\n"
        + (f"SetEnv PATH={session_path}\n" if session_path else "")
    )
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {' '.join((d / 'host_key.pub').read_text().split()[:2])}\n")
    sshd = _launch_sshd(d, port)
    uri = (f"qemu+libssh://{REMOTE_USER}@127.0.0.1:{port}/session"
           f"?keyfile={d / 'client_key'}&known_hosts={d / 'known_hosts'}&sshauth=privkey")
    (d / "uri").write_text(uri)
    return uri, sshd


def _launch_sshd(d: Path, port: int) -> subprocess.Popen:
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    # Its own output goes to its log: a caller reading our stdout (a shell's $(...)) must not wait for sshd.
    # What it says before its log is open (a missing library, say) goes to sshd.stderr.
    with open(d / "sshd.stderr", "wb") as stderr:
        sshd = subprocess.Popen([SSHD, "-D", "-f", str(d / "sshd_config"), "-E", str(d / "sshd.log")],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 10
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return sshd
        if time.monotonic() > deadline or sshd.poll() is not None:
            sshd.kill()
            said = "".join(p.read_text(errors="replace") for p in (d / "sshd.stderr", d / "sshd.log") if p.exists())
            raise StandInError(f"the stand-in sshd did not listen on 127.0.0.1:{port} (exit {sshd.wait()}): {said[-500:]}")
        time.sleep(0.1)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cut_off(sshd_pid: int) -> None:
    """The host goes away for its clients: its sshd and every connection
    through it (sshd's children, libvirt's helper among them) end at once.
    What runs there on its own (the libvirt session daemon, the lab's QEMU)
    runs on, as on a host cut off by the network."""
    for pid in [sshd_pid, *_descendants(sshd_pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def come_back(d: Path, uri: str) -> subprocess.Popen:
    """The host answers again, at the same address and with the same keys."""
    return _launch_sshd(d, int(uri.split("@127.0.0.1:")[1].split("/")[0]))


def stop(d: Path, sshd: subprocess.Popen | None = None) -> None:
    """End the stand-in's sshd and the libvirt session daemon libvirt started over it."""
    if sshd is not None:
        sshd.terminate()
        sshd.wait(timeout=10)
    else:
        try:
            os.kill(int((d / "sshd.pid").read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
    end_session_daemon()


def end_session_daemon() -> None:
    """End the remote user's libvirt session daemon (the next connection starts one)."""
    # It would idle out after 2 minutes; it is ours, so end it now.
    pidfile = Path(pwd.getpwnam(REMOTE_USER).pw_dir) / ".cache/libvirt/libvirtd.pid"
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def as_remote_user(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", REMOTE_USER, "--", *argv], capture_output=True, text=True)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("start", "stop"):
        sys.exit(__doc__)
    folder = Path(sys.argv[2]).absolute()
    try:
        if sys.argv[1] == "start":
            print(start(folder)[0])
        else:
            stop(folder)
    except StandInError as e:
        sys.exit(f"error: {e}")
