"""Which libvirt URIs name a remote host, and what xenlab takes from them to
reach it over SSH the way libvirt does."""

from __future__ import annotations

from xenlab.lab.remote import RemoteHost


def test_remote_uris():
    host = RemoteHost.of("qemu+libssh://ci@10.0.0.5:2222/session?keyfile=/k/id&known_hosts=/k/known&sshauth=privkey")
    assert (host.host, host.user, host.port, host.keyfile, host.known_hosts) == ("10.0.0.5", "ci", 2222, "/k/id", "/k/known")
    assert host.where == "ci@10.0.0.5:2222"
    plain = RemoteHost.of("qemu+ssh://build-host/system")
    assert (plain.user, plain.port, plain.keyfile, plain.known_hosts) == ("root", 22, "", "")


def test_local_uris_are_not_remote():
    for uri in ("qemu:///system", "qemu:///session", "qemu:///embed?root=/x", "qemu+unix:///system", "qemu+ssh:///system", ""):
        assert RemoteHost.of(uri) is None, uri
