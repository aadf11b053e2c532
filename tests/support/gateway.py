"""Set-ups shared by the gateway tests: a model with READY replicas and a client key."""

from __future__ import annotations

from decimal import Decimal

import httpx
import openai

from orchestrator.domain.lifecycle import ReplicaStatus
from orchestrator.fleet.reconcile import reconcile
from orchestrator.runtime.container import Deps


async def make_ready(client: httpx.AsyncClient, deps: Deps, model: str, *endpoints: str, **extra: object) -> list[int]:
    """Register `model` with one replica per endpoint and probe them to READY, as the jobs would."""
    r = await client.post("/api/v1/models", json={"name": model})
    model_id = r.json()["id"] if r.status_code == 201 else (await client.get(f"/api/v1/models/{model}")).json()["id"]
    ids = []
    for endpoint in endpoints:
        r = await client.post(f"/api/v1/models/{model_id}/replicas", json={"endpoint": endpoint, **extra})
        assert r.status_code == 201, r.text
        ids.append(r.json()["replica_id"])
    await reconcile(deps.store)
    await deps.health.run()
    for replica_id in ids:
        replica = await deps.store.replica(replica_id)
        assert replica is not None
        assert replica.status == ReplicaStatus.READY, replica
    return ids


async def issue_key(client: httpx.AsyncClient, user: str = "alice", rpm: int | None = None) -> tuple[int, str]:
    body: dict[str, object] = {"user_id": user}
    if rpm is not None:
        body["allowed_rpm"] = rpm
    r = (await client.post("/api/v1/generate_api_key", json=body)).json()
    return int(r["id"]), str(r["api_key"])


async def funded_key(client: httpx.AsyncClient, usd: str = "1", user: str = "llm", **extra: object) -> tuple[int, str]:
    """A client key (with `extra` fields, e.g. allowed_ips) whose balance is recharged with `usd` dollars."""
    r = await client.post("/api/v1/generate_api_key", json={"user_id": user, **extra})
    assert r.status_code == 200, r.text
    key_id, key = int(r.json()["id"]), str(r.json()["api_key"])
    if Decimal(usd):
        r = await client.post("/admin/api-key/recharge", json={"id": key_id, "balance": usd})
        assert r.json()["success"], r.text
    return key_id, key


async def balance_units(deps: Deps, key_id: int) -> int:
    """The key's balance once every call so far is written."""
    await deps.records.flush()
    return (await deps.accounts.key(key_id)).balance


def openai_client(transport: httpx.ASGITransport, api_key: str) -> openai.AsyncOpenAI:
    """The official SDK, speaking to the app through the test's ASGI transport; no retries hide errors."""
    http = httpx.AsyncClient(transport=transport, base_url="http://testserver")
    return openai.AsyncOpenAI(api_key=api_key, base_url="http://testserver/v1", http_client=http, max_retries=0)
