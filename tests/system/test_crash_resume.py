"""A server killed in the middle of provisioning resumes each replica from its stored status, with no second
VM: real `orchestrator serve` processes, a real sandbox VM, SIGKILL."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from infra.sandbox import SandboxBackend, SandboxConfig
from tests.support.sandbox import listening_on, next_subnet
from tests.support.server import poll, serving
from tests.support.toolkit import vm_details

ADMIN = "sk-crash-test-admin-key-0123456789"
BLOCK_TABLE = "orch_test_block_ssh"


@pytest.fixture
def subnet() -> str:
    return next_subnet()


@pytest.fixture
def sandbox(tmp_path: Path, subnet: str) -> Iterator[SandboxBackend]:
    """The same sandbox the servers use (same root and subnet), to look at it and clean up after."""
    assert os.geteuid() == 0, "this test needs root for nftables (CI runs as root)"
    backend = SandboxBackend(SandboxConfig(root=tmp_path / "state" / "sandbox", subnet=subnet))
    try:
        yield backend
    finally:
        _nft(f"add table inet {BLOCK_TABLE}\ndelete table inet {BLOCK_TABLE}\n")
        for replica_id in backend.owned():
            backend.destroy(replica_id)


def _nft(script: str) -> None:
    subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True)


def block_ssh(address: str) -> None:
    """Drop SSH to the sandbox before its own table sees it: the bootstrap keeps retrying to connect."""
    _nft(
        f"table inet {BLOCK_TABLE} {{\n chain input {{\n type filter hook input priority -10; policy accept;\n"
        f" ip daddr {address} tcp dport 2222 drop\n }}\n}}\n"
    )


def replica(base: str, replica_id: int) -> Callable[[], dict[str, Any]]:
    """The replica's detail, as the admin reads it."""
    headers = {"Authorization": f"Bearer {ADMIN}"}
    return lambda: httpx.get(f"{base}/api/v1/replicas/{replica_id}", headers=headers, timeout=5).json()


def test_killed_in_the_middle_of_provisioning_resumes_without_a_second_vm(
    tmp_path: Path, subnet: str, sandbox: SandboxBackend
) -> None:
    env = {"ORCH_ADMIN_API_KEY": ADMIN, "ORCH_SANDBOX_SUBNET": subnet, "ORCH_LOG_LEVEL": "WARNING"}
    address = str(ipaddress.ip_network(subnet)[1])  # replica 1's sandbox
    block_ssh(address)
    headers = {"Authorization": f"Bearer {ADMIN}"}
    with serving(tmp_path / "state", env=env, stop_signal=signal.SIGKILL) as (base, _):
        model = httpx.post(f"{base}/api/v1/models", json={"name": "sim-llama"}, headers=headers).json()
        r = httpx.post(
            f"{base}/api/v1/models/{model['id']}/replicas",
            json={"create_vm": True, "vm_creation_details": vm_details(security_rules=[])},
            headers=headers,
        )
        assert r.status_code == 201, r.text
        replica_id = r.json()["replica_id"]
        poll(replica(base, replica_id), lambda b: b["status"] == "BOOTSTRAPPING")
    # SIGKILLed while connecting over SSH. The VM outlives the server, as a cloud VM would.
    sshd_pid = (sandbox.work_dir(replica_id).parent / "sshd.pid").read_text()
    assert listening_on(address) == [f"{address}:2222"]

    _nft(f"delete table inet {BLOCK_TABLE}\n")
    with serving(tmp_path / "state", env=env) as (base, _):
        detail = poll(replica(base, replica_id), lambda b: b["status"] in {"READY", "TERMINATED"})
        assert detail["status"] == "READY", detail["events"]
        walk = [e["to_status"] for e in detail["events"] if e["from_status"] != e["to_status"]]
        assert walk == ["PENDING", "PROVISIONING", "BOOTSTRAPPING", "STARTING", "SECURING", "READY"]
        assert (sandbox.work_dir(replica_id).parent / "sshd.pid").read_text() == sshd_pid  # the same VM
        assert sandbox.owned() == {replica_id}
        assert sorted(listening_on(address)) == [f"{address}:2222", f"{address}:8000"]

        assert httpx.delete(f"{base}/api/v1/replicas/{replica_id}", headers=headers).status_code == 204
        poll(replica(base, replica_id), lambda b: b["status"] == "TERMINATED")
    assert listening_on(address) == []
    assert sandbox.owned() == frozenset()
