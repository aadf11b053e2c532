"""The `hosts` backend on a `machine` VM registered as a host with two stand-in GPUs: replicas are placed on it,
bootstrapped over SSH as VMs are (sudo, systemd, the engine simulator behind the docker stand-in), serve through
the gateway, and are released on delete; a replica that does not fit waits in PENDING until one is.

Real: the machine (systemd, sshd, sudo, cloud-init), the SSH logins with the pinned host key, the units, the
per-replica nft tables inside the machine (nftables in the image), the firewall outside it, the gateway's calls."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from infra.hosts import HostsBackend
from infra.machine import MachineBackend
from infra.vm import Rule, VmHandle
from orchestrator.domain.lifecycle import ReplicaStatus
from orchestrator.fleet.reconcile import reconcile
from orchestrator.fleet.security_rules import rule_of
from orchestrator.fleet.sweeps import orphan_sweep, rules_drift
from orchestrator.platform.settings import Settings
from orchestrator.runtime.compose import machine_backend
from orchestrator.runtime.container import Deps
from provisioning.ssh_keys import generate_keypair
from tests.support.gateway import issue_key, openai_client
from tests.support.sandbox import connects
from tests.support.settings import instance_settings
from tests.support.toolkit import create_model, vm_details
from tests.support.vm import vm_request

S = ReplicaStatus
MODEL = "sim-llama"
GATEWAY, ORCHESTRATOR, STRANGER = "10.212.0.1", "10.212.0.2", "10.212.0.3"
HOST_MACHINE = 9
"""The machine's id in its own backend (its /30 in the subnet); the database's replicas are 1, 2, 3."""
HOST_RULES = (
    Rule("ingress", "tcp", "IPv4", "0.0.0.0/0", 22, 22),  # the server's own firewall: SSH from anywhere, as many do
    Rule("ingress", "tcp", "IPv4", "0.0.0.0/0", 8100, 8199),  # engine ports open: each replica's table guards its own
)


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'orchestrator.db'}"


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    assert os.geteuid() == 0, "machine VMs need root (mounts, namespaces, nftables); CI runs as root"
    base = instance_settings(tmp_path / "state", database_url)
    return base.model_copy(
        update={
            "infra_backend": "hosts",
            "machine_subnet": "10.213.7.0/24",  # apart from the machine backend's own tests
            "orchestrator_cidr": f"{ORCHESTRATOR}/32",
            "gateway_cidr": f"{GATEWAY}/32",
            "ssh_source_address": ORCHESTRATOR,
            "foreign_source_address": STRANGER,
        }
    )


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[tuple[MachineBackend, str, str, str]]:
    """A booted machine standing in for the team's GPU server: (machines, address, admin key, host key)."""
    machines, _, _ = machine_backend(settings.model_copy(update={"infra_backend": "machine"}))
    assert isinstance(machines, MachineBackend)
    admin_private, admin_public = generate_keypair("admin@laptop")
    request = vm_request(HOST_MACHINE, HOST_RULES, ssh_public_key=admin_public)
    try:
        await asyncio.to_thread(machines.up, request)
        yield machines, machines.address(HOST_MACHINE), admin_private, request.host_public_key
    finally:
        await asyncio.to_thread(machines.destroy, HOST_MACHINE)


async def drive(deps: Deps, replica_ids: list[int], want: dict[int, ReplicaStatus], timeout_s: float = 120) -> None:
    """Run the jobs until every replica in `want` is in its status (the machine's processes are its own)."""
    deadline = time.monotonic() + timeout_s
    while True:
        await reconcile(deps.store, deps.managed)
        await deps.managed.settle()
        await deps.health.run()
        rows = {rid: await deps.store.replica(rid) for rid in replica_ids}
        now = {rid: S(r.status) for rid, r in rows.items() if r is not None}
        if all(now.get(rid) is status for rid, status in want.items()):
            return
        for rid, r in rows.items():
            if r is not None and r.status in {S.TERMINATING, S.TERMINATED} and want.get(rid) is not S.TERMINATED:
                detail = await deps.replicas.detail(rid)
                pytest.fail(
                    f"{rid} ended {r.termination_reason}: {[(e.reason, e.message) for e in detail.events][-4:]}"
                )
        assert time.monotonic() < deadline, f"not {want} after {timeout_s} s: {now}"
        await asyncio.sleep(0.1)


def on_host(machines: MachineBackend, path: str) -> Path:
    """A file of the host machine, in its overlay's upper layer on this machine."""
    return machines.config.root / f"replica-{HOST_MACHINE}" / "upper" / path.lstrip("/")


def host_tables(machines: MachineBackend) -> set[str]:
    init = machines.init_pid(HOST_MACHINE)
    out = subprocess.run(
        ["nsenter", "-t", str(init), "-n", "nft", "-j", "list", "tables"], capture_output=True, text=True, check=True
    ).stdout
    return {t["table"]["name"] for t in json.loads(out)["nftables"] if "table" in t}


async def chat(transport: httpx.ASGITransport, key: str) -> str:
    answer = await openai_client(transport, key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    return answer.choices[0].message.content or ""


async def test_replicas_are_placed_on_a_registered_host_serve_and_are_released_on_delete(
    deps: Deps,
    client: httpx.AsyncClient,
    transport: httpx.ASGITransport,
    server: tuple[MachineBackend, str, str, str],
) -> None:
    machines, address, admin_key, host_key = server
    assert isinstance(deps.managed.backend, HostsBackend)
    r = await client.post(
        "/api/v1/hosts",
        json={
            "name": "gpu-box",
            "pool": "rack-a",
            "address": address,
            "ssh_user": "ubuntu",
            "ssh_private_key": admin_key,
            "host_key": host_key,
            "gpus": 2,
        },
    )
    assert r.status_code == 201, r.text
    host_id = r.json()["id"]

    model_id = await create_model(client, MODEL)
    details = vm_details(environment_name="rack-a", flavor_name="n3-A100x1", run_command=None, security_rules=[])

    async def create() -> int:
        r = await client.post(
            f"/api/v1/models/{model_id}/replicas", json={"create_vm": True, "vm_creation_details": details}
        )
        assert r.status_code == 201, r.text
        return int(r.json()["replica_id"])

    first, second = await create(), await create()
    await drive(deps, [first, second], {first: S.READY, second: S.READY})
    third = await create()
    ids = [first, second, third]
    for _ in range(3):  # passes of the reconcile job: each tries to place it again
        await reconcile(deps.store, deps.managed)
        await deps.managed.settle()
    waiting = await deps.store.replica(third)
    assert waiting is not None
    assert waiting.status == S.PENDING
    assert waiting.probe_error == (
        "waiting for room: no host of pool 'rack-a' has 1 free GPU (gpu-box: 0 of 2 GPUs free)"
    )
    events = (await client.get(f"/api/v1/replicas/{third}")).json()["events"]
    assert [e["reason"] for e in events if e["reason"] == "waiting_for_host"] == ["waiting_for_host"]  # said once
    listed = {r["id"]: r for r in (await client.get(f"/api/v1/models/{model_id}/replicas")).json()}
    assert (listed[third]["vm_status"], listed[third]["error_message"]) == ("PENDING", waiting.probe_error)  # the UI's

    # Each on the host's own address, its own GPU and port, bootstrapped in its own unit and directory.
    placed = {
        p["replica_id"]: (p["gpus"], p["engine_port"])
        for p in (await client.get("/api/v1/hosts")).json()[0]["replicas"]
    }
    assert placed == {first: ([0], 8100), second: ([1], 8101)}
    for rid, gpu, port in ((first, 0, 8100), (second, 1, 8101)):
        replica = await deps.store.replica(rid)
        assert replica is not None
        assert (replica.vm_address, replica.port, replica.ssh_user) == (address, port, "ubuntu")
        assert replica.host_key == " ".join(host_key.split()[:2])  # the server's own key is the one pinned
        run = on_host(machines, f"/opt/orchestrator-engine/replica-{rid}/run.sh").read_text()
        assert f"exec env CUDA_VISIBLE_DEVICES={gpu} ENGINE_PORT={port} /bin/sh -c " in run
        assert on_host(machines, f"/etc/systemd/system/orchestrator-engine-r{rid}.service").exists()
        assert connects(address, port, GATEWAY)
        assert not connects(address, port, STRANGER)  # the replica's own table, inside the host
        detail = (await client.get(f"/api/v1/replicas/{rid}")).json()
        [secured] = [e["message"] for e in detail["events"] if e["reason"] == "secured"]
        assert f"a foreign source ({STRANGER})" in secured
        assert "SSH left as the host's own firewall has it" in secured  # open to the stranger: not the replica's
        [gpu_check] = [e["message"] for e in detail["events"] if e["reason"] == "bootstrap_gpu"]
        assert "GPU 0: " in gpu_check  # the placement's plain values are no secrets: never redacted from outputs
    assert connects(address, 22, ORCHESTRATOR)  # a replica never closes the host's SSH
    assert await rules_drift(deps.managed) == []  # each table read back from the host is its stored set
    # A restarted leader knows nothing of the hosts until it reads them: every backend call reads them first.
    deps.managed.backend.book.replace([], {})
    stored = {rule_of(r) for r in await deps.store.security_rules(first)}
    handle = VmHandle(first, "", address, 22, "ubuntu")
    assert await deps.managed.in_thread(deps.managed.backend.enforced_rules, handle) == stored
    assert await orphan_sweep(deps.managed) == []  # and what the host holds is theirs
    assert {f"orch_replica_{first}", f"orch_replica_{second}"} <= host_tables(machines)

    _, key = await issue_key(client)
    for _ in range(4):
        assert await chat(transport, key)
    assert (await client.delete(f"/api/v1/hosts/{host_id}")).status_code == 409

    # Deleting the first releases its GPU and port: the waiting replica is placed there.
    assert (await client.delete(f"/api/v1/replicas/{first}")).status_code == 204
    await drive(deps, ids, {first: S.TERMINATED, third: S.READY})
    placed = {
        p["replica_id"]: (p["gpus"], p["engine_port"])
        for p in (await client.get("/api/v1/hosts")).json()[0]["replicas"]
    }
    assert placed == {second: ([1], 8101), third: ([0], 8100)}
    assert not on_host(machines, f"/opt/orchestrator-engine/replica-{first}").exists()
    assert not on_host(machines, f"/etc/systemd/system/orchestrator-engine-r{first}.service").exists()
    assert f"orch_replica_{first}" not in host_tables(machines)
    authorized = on_host(machines, "/home/ubuntu/.ssh/authorized_keys").read_text()
    assert f"orchestrator-replica-{first}\n" not in authorized
    assert f"orchestrator-replica-{third}\n" in authorized
    assert await chat(transport, key)

    # A replica of a pool with no host waits, and is deleted without ever reaching a host, even with another host
    # of another pool out of reach (nothing listens on its port).
    ghost = {"name": "ghost", "pool": "elsewhere", "address": GATEWAY, "ssh_port": 1, "gpus": 1}
    r = await client.post(
        "/api/v1/hosts", json={**ghost, "ssh_user": "ubuntu", "ssh_private_key": admin_key, "host_key": host_key}
    )
    assert r.status_code == 201, r.text
    r = await client.post(
        f"/api/v1/models/{model_id}/replicas",
        json={"create_vm": True, "vm_creation_details": {**details, "environment_name": "rack-z"}},
    )
    nowhere = int(r.json()["replica_id"])
    ids.append(nowhere)
    await reconcile(deps.store, deps.managed)
    await deps.managed.settle()
    row = await deps.store.replica(nowhere)
    assert row is not None
    assert row.probe_error == "no enabled host is registered in pool 'rack-z'"

    for rid in (second, third, nowhere):
        assert (await client.delete(f"/api/v1/replicas/{rid}")).status_code == 204
    await drive(deps, ids, dict.fromkeys(ids, S.TERMINATED), timeout_s=30)
    assert await asyncio.to_thread(deps.managed.backend.owned) == frozenset()
    assert "orchestrator-replica-" not in on_host(machines, "/home/ubuntu/.ssh/authorized_keys").read_text()
    assert (await client.delete(f"/api/v1/hosts/{host_id}")).status_code == 204
