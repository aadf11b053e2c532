"""The `hosts` backend's logins against a real sshd: the pinned host key and the registered key are all it
accepts, and a command's errors (its stderr) reach the message."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from infra.hosts import HostBook, HostLogin, HostsBackend
from infra.vm import BackendError
from provisioning.ssh_keys import generate_keypair
from tests.support.sshd import USER, Sshd


@pytest.fixture
def sshd() -> Iterator[Sshd]:
    server = Sshd()
    server.start()
    try:
        yield server
    finally:
        server.close()


def login(sshd: Sshd, **changes: str) -> HostLogin:
    fields = {"ssh_private_key": sshd.client_key, "host_public_key": sshd.host_key} | changes
    return HostLogin("box", sshd.address, sshd.port, USER, fields["ssh_private_key"], fields["host_public_key"])


def test_a_command_answers_its_status_and_its_output_stderr_included(sshd: Sshd) -> None:
    backend = HostsBackend(HostBook(), timeout_s=5)
    with backend.session(login(sshd)) as shell:
        assert shell.call("echo out; echo err >&2; exit 3") == (3, "out\nerr\n")
        assert shell.call("cat", stdin="from stdin") == (0, "from stdin")
        with pytest.raises(BackendError, match=r"host box: checking failed \(exit 1\): nope"):
            shell.run("echo nope >&2; exit 1", "checking")


def test_another_host_key_than_the_pinned_one_is_refused(sshd: Sshd) -> None:
    backend = HostsBackend(HostBook(), timeout_s=5)
    stranger = generate_keypair("someone-else")[1]
    with (
        pytest.raises(BackendError, match="presented a host key other than the pinned one"),
        backend.session(login(sshd, host_public_key=stranger)),
    ):
        pass


def test_a_key_the_host_does_not_know_is_refused_without_quoting_it(sshd: Sshd) -> None:
    backend = HostsBackend(HostBook(), timeout_s=5)
    other = generate_keypair("other")[0]
    with (
        pytest.raises(BackendError, match="refused the registered key for 'root'") as caught,
        backend.session(login(sshd, ssh_private_key=other)),
    ):
        pass
    assert "PRIVATE KEY" not in str(caught.value)
