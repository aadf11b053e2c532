"""Health probing against real engine simulators: to READY, out to UNHEALTHY and back, never-ready, failover."""

from __future__ import annotations

import asyncio
import dataclasses

import httpx
import openai
import pytest

from orchestrator.domain.lifecycle import ReplicaStatus
from orchestrator.fleet.reconcile import reconcile
from orchestrator.runtime.container import Deps
from tests.support.engines import engine_in_process, engine_process, free_port
from tests.support.gateway import issue_key, make_ready, openai_client

S = ReplicaStatus
MODEL = "qwen"


async def _status(deps: Deps, replica_id: int) -> str:
    replica = await deps.store.replica(replica_id)
    assert replica is not None
    return replica.status


async def test_full_url_and_base_url_both_reach_ready(client: httpx.AsyncClient, deps: Deps) -> None:
    async with engine_in_process(MODEL) as a, engine_in_process(MODEL) as b:
        await make_ready(client, deps, MODEL, a.chat_url, f"{b.url}/v1/")
        assert len(deps.catalog.pools[MODEL]) == 2


async def test_replica_that_stops_answering_leaves_the_pool_and_comes_back(
    client: httpx.AsyncClient, transport: httpx.ASGITransport, deps: Deps
) -> None:
    async with engine_in_process(MODEL) as engine:
        [replica_id] = await make_ready(client, deps, MODEL, engine.chat_url)
        _, key = await issue_key(client)
        sdk = openai_client(transport, key)

        await engine.set_faults(dead=True)
        for _ in range(deps.settings.unhealthy_after - 1):
            await deps.health.run()
            assert await _status(deps, replica_id) == S.READY
        await deps.health.run()
        assert await _status(deps, replica_id) == S.UNHEALTHY
        assert deps.catalog.pools.get(MODEL, []) == []
        with pytest.raises(openai.InternalServerError) as refused:  # not routed to an UNHEALTHY replica
            await sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert refused.value.status_code == 503

        await engine.set_faults(dead=False)
        for _ in range(deps.settings.healthy_after):
            await deps.health.run()
        assert await _status(deps, replica_id) == S.READY
        answer = await sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert answer.choices
        detail = (await client.get(f"/api/v1/replicas/{replica_id}")).json()
        assert [e["to_status"] for e in detail["events"]][-3:] == ["READY", "UNHEALTHY", "READY"]


async def test_wrong_model_on_the_engine_never_becomes_ready(client: httpx.AsyncClient, deps: Deps) -> None:
    async with engine_in_process("something-else") as engine:
        model_id = (await client.post("/api/v1/models", json={"name": MODEL})).json()["id"]
        r = await client.post(f"/api/v1/models/{model_id}/replicas", json={"endpoint": engine.chat_url})
        replica_id = r.json()["replica_id"]
        await reconcile(deps.store)
        await deps.health.run()
        assert await _status(deps, replica_id) == S.STARTING


async def test_never_ready_replica_is_terminated_with_a_reason(client: httpx.AsyncClient, deps: Deps) -> None:
    deps.health.policy = dataclasses.replace(deps.health.policy, startup_grace_s=0.0)
    model_id = (await client.post("/api/v1/models", json={"name": MODEL})).json()["id"]
    closed = f"http://127.0.0.1:{free_port()}/v1"
    replica_id = (await client.post(f"/api/v1/models/{model_id}/replicas", json={"endpoint": closed})).json()[
        "replica_id"
    ]
    await reconcile(deps.store)
    await deps.health.run()
    await reconcile(deps.store)
    [replica] = (await client.get(f"/api/v1/models/{model_id}/replicas")).json()
    assert (replica["status"], replica["vm_status"]) == ("TERMINATED", "FAILED")
    assert replica["error_message"]
    detail = (await client.get(f"/api/v1/replicas/{replica_id}")).json()
    assert detail["termination_reason"] == "never_ready"


async def test_killing_an_engine_under_load_loses_no_request(
    client: httpx.AsyncClient, transport: httpx.ASGITransport, deps: Deps
) -> None:
    # Real processes: one is killed with SIGKILL in the middle of the load.
    with engine_process(MODEL, "--ttft", "0.01") as (a, proc_a), engine_process(MODEL, "--ttft", "0.01") as (b, _):
        killed, _survivor = await make_ready(client, deps, MODEL, a.chat_url, b.chat_url)
        _, key = await issue_key(client, rpm=100_000)
        sdk = openai_client(transport, key)
        done = 0

        async def one() -> None:
            nonlocal done
            answer = await sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
            assert answer.choices
            done += 1
            if done == 40:
                proc_a.kill()

        async def worker(n: int) -> None:
            for _ in range(n):
                await one()

        results = await asyncio.gather(*(worker(15) for _ in range(8)), return_exceptions=True)
        assert [r for r in results if r is not None] == []
        assert done == 120
        # The refused connections counted as failed probes; probes confirm and take it out of the pool.
        for _ in range(deps.settings.unhealthy_after):
            await deps.health.run()
        assert await _status(deps, killed) == S.UNHEALTHY
