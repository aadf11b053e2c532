"""Registered hosts through the admin API, and placement on them in the store, on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy import text

from orchestrator.domain.lifecycle import ReplicaStatus
from orchestrator.domain.placement import Spot
from orchestrator.runtime.compose import Runtime
from orchestrator.runtime.container import Deps
from orchestrator.store.db import make_sessions
from orchestrator.store.hosts import HostStore
from orchestrator.store.tables import Host, LlmModel, Replica
from provisioning.ssh_keys import generate_keypair

S = ReplicaStatus
PORTS = range(8100, 8110)
PRIVATE, _ = generate_keypair("admin@laptop")
_, HOST_KEY = generate_keypair("root@gpu-1")
TRUNCATED = "\n".join([*PRIVATE.splitlines()[:2], PRIVATE.splitlines()[-1]])
"""An OpenSSH private key cut to its header and first base64 line."""


def host_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "gpu-1",
        "pool": "rack-a",
        "address": "192.0.2.10",
        "ssh_user": "ubuntu",
        "ssh_private_key": PRIVATE,
        "host_key": HOST_KEY,
        "gpus": 2,
    }
    return body | overrides


async def replica_in(deps: Deps, pool: str = "rack-a", flavor: str = "n3-A100x1") -> int:
    model = await deps.store.model_by_name("llama") or await deps.store.create_model(LlmModel(name="llama"))
    row = Replica(model_id=model.id or 0, create_vm=True, environment_name=pool, flavor_name=flavor, port=8000)
    return await deps.store.create_replica(row, [], "test")


async def terminate(deps: Deps, replica_id: int) -> None:
    assert await deps.store.move(replica_id, S.PENDING, S.TERMINATING, "deleted")
    assert await deps.store.move(replica_id, S.TERMINATING, S.TERMINATED, "destroyed")


async def test_a_host_is_registered_listed_without_its_key_and_deleted(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    r = await client.post("/api/v1/hosts", json=host_body())
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["name"] == "gpu-1"
    assert created["gpus"] == 2
    assert created["gpus_used"] == 0
    assert created["host_key"] == " ".join(HOST_KEY.split()[:2])
    assert "ssh_private_key" not in created
    assert "PRIVATE KEY" not in r.text
    listed = (await client.get("/api/v1/hosts")).json()
    assert [h["name"] for h in listed] == ["gpu-1"]
    assert "PRIVATE KEY" not in str(listed)
    async with runtime.deps.engine.connect() as conn:
        sealed = (await conn.execute(text("SELECT ssh_key_sealed FROM hosts"))).scalar_one()
    assert "PRIVATE KEY" not in sealed
    assert runtime.deps.box.open(sealed) == PRIVATE
    assert (await client.post("/api/v1/hosts", json=host_body(address="192.0.2.11"))).status_code == 409
    assert (await client.delete(f"/api/v1/hosts/{created['id']}")).status_code == 204
    assert (await client.get("/api/v1/hosts")).json() == []
    assert (await client.delete(f"/api/v1/hosts/{created['id']}")).status_code == 404
    assert (await client.put(f"/api/v1/hosts/{created['id']}", json={"disabled": True})).status_code == 404
    assert (await client.put("/api/v1/hosts/1", json={"disabled": "maybe"})).status_code == 400


BAD = [
    ("name", "GPU 1"),
    ("pool", ""),
    ("address", "not an address!"),
    ("address", "999.1.1.1"),
    ("ssh_port", 0),
    ("ssh_port", 70000),
    ("ssh_port", 8150),  # inside ORCH_HOST_PORT_MIN..MAX: an engine port, rejected by its replica's table
    ("ssh_user", "root"),
    ("ssh_user", "bad user"),
    ("ssh_private_key", "-----BEGIN OPENSSH PRIVATE KEY-----\nnot a key\n-----END OPENSSH PRIVATE KEY-----"),
    ("host_key", "ssh-ed25519 not-base64!"),
    ("host_key", "just-one-word"),
    ("host_key", "foo AAAA"),  # a key type paramiko does not know
    ("host_key", "sk-ssh-ed25519@openssh.com AAAA"),
    ("ssh_private_key", TRUNCATED),
    ("gpus", -1),
    ("gpus", 1000),
    ("gpus", "two"),
    ("surprise", 1),
]


async def test_a_bad_registration_is_a_400_naming_the_field_and_never_quoting_a_key(client: httpx.AsyncClient) -> None:
    for field, value in BAD:
        r = await client.post("/api/v1/hosts", json=host_body(**{field: value}))
        assert r.status_code == 400, (field, value, r.text)
        assert field in r.json()["errors"], r.text
        assert "not a key" not in r.text
        assert "PRIVATE KEY" not in r.text
    assert (await client.get("/api/v1/hosts")).json() == []


async def test_hosts_need_the_admin_key(anon_client: httpx.AsyncClient) -> None:
    assert (await anon_client.get("/api/v1/hosts")).status_code == 401
    assert (await anon_client.post("/api/v1/hosts", json=host_body())).status_code == 401


async def test_placement_takes_free_gpus_and_ports_waits_when_full_and_is_released_at_terminated(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    deps = runtime.deps
    store = HostStore(make_sessions(deps.engine))
    host = (await client.post("/api/v1/hosts", json=host_body())).json()
    first, second, third = [await replica_in(deps) for _ in range(3)]
    a = await store.place(first, "rack-a", 1, PORTS)
    b = await store.place(second, "rack-a", 1, PORTS)
    assert a == Spot(host["id"], "gpu-1", (0,), 8100)
    assert b == Spot(host["id"], "gpu-1", (1,), 8101)
    assert await store.place(first, "rack-a", 1, PORTS) == a  # kept: a retried step asks again
    waiting = await store.place(third, "rack-a", 1, PORTS)
    assert waiting == "waiting for room: no host of pool 'rack-a' has 1 free GPU (gpu-1: 0 of 2 GPUs free)"
    assert await store.place(await replica_in(deps, pool="rack-b"), "rack-b", 1, PORTS) == (
        "no enabled host is registered in pool 'rack-b'"
    )

    listed = (await client.get("/api/v1/hosts")).json()[0]
    assert listed["gpus_used"] == 2
    assert [(p["replica_id"], p["gpus"], p["engine_port"]) for p in listed["replicas"]] == [
        (first, [0], 8100),
        (second, [1], 8101),
    ]
    r = await client.delete(f"/api/v1/hosts/{host['id']}")
    assert r.status_code == 409
    assert str(first) in r.json()["error"]

    await terminate(deps, first)
    r = await client.put(f"/api/v1/hosts/{host['id']}", json={"disabled": True})
    assert r.status_code == 200
    assert r.json()["disabled"] is True
    assert r.json()["gpus_used"] == 1  # the replica on it stays
    assert await store.place(third, "rack-a", 1, PORTS) == "no enabled host is registered in pool 'rack-a'"
    assert (await client.put(f"/api/v1/hosts/{host['id']}", json={"disabled": False})).json()["disabled"] is False
    assert await store.place(third, "rack-a", 1, PORTS) == Spot(host["id"], "gpu-1", (0,), 8100)
    await terminate(deps, second)
    await terminate(deps, third)
    assert (await client.get("/api/v1/hosts")).json()[0]["gpus_used"] == 0
    assert (await client.delete(f"/api/v1/hosts/{host['id']}")).status_code == 204


async def test_a_hosts_ssh_port_is_never_given_as_an_engine_port(runtime: Runtime) -> None:
    """A host stored with its SSH port among the engine ports (registered before the check, or with other
    ORCH_HOST_PORT_MIN/MAX): placement passes that port over."""
    deps = runtime.deps
    store = HostStore(make_sessions(deps.engine))
    host = await store.add(
        Host(
            name="gpu-9",
            pool="rack-a",
            address="192.0.2.19",
            ssh_port=8100,
            ssh_user="ubuntu",
            ssh_key_sealed=deps.box.seal(PRIVATE),
            host_key=HOST_KEY,
            gpus=1,
        )
    )
    assert await store.place(await replica_in(deps), "rack-a", 1, PORTS) == Spot(host.id or 0, "gpu-9", (0,), 8101)
