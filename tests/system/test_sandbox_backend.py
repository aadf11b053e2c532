"""The local sandbox backend on real sshd and real nftables: a VM per address, its rules enforced by the
kernel, nothing left after destroy."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra import nft
from infra.sandbox import PRIVSEP_DIR, SandboxBackend
from infra.vm import Rule
from tests.support.sandbox import FOREIGN, connects, listening_on, sandbox_backend
from tests.support.vm import vm_request

ORCHESTRATOR, GATEWAY = "127.0.0.2", "127.0.0.1"


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[SandboxBackend]:
    assert shutil.which("sshd") or Path("/usr/sbin/sshd").exists(), "scripts/test installs openssh-server"
    assert os.geteuid() == 0, "the sandbox tests need root for nftables (CI runs as root)"
    assert shutil.which("nft"), "scripts/test installs nftables"
    with sandbox_backend(tmp_path / "sandbox") as b:
        assert b.not_enforced_reason is None
        yield b


def ssh_from(cidr: str, port: int = 2222) -> Rule:
    return Rule("ingress", "tcp", "IPv4", cidr, port, port)


def test_up_starts_sshd_with_the_given_host_key_behind_its_rules(backend: SandboxBackend) -> None:
    req = vm_request(1, (ssh_from(f"{ORCHESTRATOR}/32"),))
    handle = backend.up(req)

    assert handle.address == backend.address(1)
    assert listening_on(handle.address) == [f"{handle.address}:2222"]
    assert (backend.work_dir(1).parent / "host_ed25519.pub").read_text() == req.host_public_key
    assert connects(handle.address, 2222, ORCHESTRATOR)
    assert not connects(handle.address, 2222, FOREIGN)
    assert not connects(handle.address, 2222, GATEWAY)
    assert backend.enforced_rules(handle) == {ssh_from(f"{ORCHESTRATOR}/32")}
    assert backend.owned() == {1}


def test_up_again_is_idempotent_and_apply_rules_replaces_the_set(backend: SandboxBackend) -> None:
    req = vm_request(2, (ssh_from(f"{ORCHESTRATOR}/32"),))
    first = backend.up(req)
    pid = (backend.work_dir(2).parent / "sshd.pid").read_text()
    assert backend.up(req) == first
    assert (backend.work_dir(2).parent / "sshd.pid").read_text() == pid  # the same sshd, not a second VM

    backend.apply_rules(req, [ssh_from(f"{FOREIGN}/32")])
    assert connects(first.address, 2222, FOREIGN)
    assert not connects(first.address, 2222, ORCHESTRATOR)
    assert backend.enforced_rules(first) == {ssh_from(f"{FOREIGN}/32")}


def test_a_rule_added_or_removed_behind_its_back_reads_as_drift(backend: SandboxBackend) -> None:
    handle = backend.up(vm_request(3, (ssh_from(f"{ORCHESTRATOR}/32"),)))
    nft.delete(handle.address)
    assert backend.enforced_rules(handle) == {nft.OPEN_TO_ALL}
    assert connects(handle.address, 2222, FOREIGN)  # really open: the table is gone


def test_destroy_leaves_no_process_table_or_file(backend: SandboxBackend) -> None:
    handle = backend.up(vm_request(4, (ssh_from(f"{ORCHESTRATOR}/32"),)))
    vm_dir = backend.work_dir(4).parent
    backend.destroy(4)
    assert listening_on(handle.address) == []
    assert handle.address not in nft.sandbox_tables()
    assert not vm_dir.exists()
    assert backend.owned() == frozenset()
    backend.destroy(4)  # twice is fine


def test_without_nft_the_rules_are_recorded_and_the_reason_given(tmp_path: Path) -> None:
    with sandbox_backend(tmp_path / "sandbox", enforce_rules=False) as backend:
        assert backend.not_enforced_reason == "disabled by configuration"
        rules = (ssh_from(f"{ORCHESTRATOR}/32"),)
        handle = backend.up(vm_request(5, rules))
        assert backend.enforced_rules(handle) == set(rules)
        assert handle.address not in nft.sandbox_tables()
        assert connects(handle.address, 2222, FOREIGN)  # nothing enforces them: the server says so at start


def test_a_machine_fresh_from_boot_needs_no_run_sshd_made_by_hand(backend: SandboxBackend) -> None:
    """/run is empty after a boot and no system sshd made /run/sshd: the backend makes it, as sshd needs it."""
    shutil.rmtree(PRIVSEP_DIR, ignore_errors=True)
    handle = backend.up(vm_request(5, (ssh_from(f"{ORCHESTRATOR}/32"),)))
    assert listening_on(handle.address) == [f"{handle.address}:2222"]
    assert PRIVSEP_DIR.stat().st_mode & 0o777 == 0o755
