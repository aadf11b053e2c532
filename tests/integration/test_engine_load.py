"""The engines' load scraped from real engine simulators' `/metrics`: per replica and summed per model, with the
engine key sent, the gateway's queue added, a silent replica left out (logged once, key hidden), and the samples in
the server's own metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import httpx
from aiohttp import web
from aiohttp.typedefs import Handler
from structlog.testing import capture_logs

from orchestrator.enginesim.server import SimConfig, build_app
from orchestrator.fleet.engine_load import EngineLoad
from orchestrator.runtime.container import Deps
from tests.support.engines import Engine, app_in_process
from tests.support.gateway import make_ready
from tests.support.toolkit import vm_details

MODEL = "qwen"
KEY = "engine-secret-7f3a"


@asynccontextmanager
async def engine_with_guarded_metrics(**knobs: Any) -> AsyncIterator[tuple[Engine, list[str]]]:
    """A simulator whose `/metrics` needs the engine key (as a proxy in front of vLLM may); yields what each
    `/metrics` request carried."""
    seen: list[str] = []

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/metrics":
            seen.append(request.headers.get("Authorization", ""))
            if request.headers.get("Authorization") != f"Bearer {KEY}":
                return web.Response(status=401)
        return await handler(request)

    app = build_app(SimConfig(model=MODEL, api_key=KEY, **knobs))
    app.middlewares.append(guard)
    async with app_in_process(app) as url:
        yield Engine(url, MODEL), seen


async def until(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + 5
    while not await predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def test_scrape_sums_running_and_waiting_per_model(client: httpx.AsyncClient, deps: Deps) -> None:
    paced = {"max_num_seqs": 1, "tokens_per_s": 10}
    async with (
        engine_with_guarded_metrics(**paced) as (a, seen),
        engine_with_guarded_metrics(**paced) as (b, _),
        aiohttp.ClientSession() as http,
    ):
        ids = await make_ready(client, deps, MODEL, a.chat_url, b.chat_url, engine_api_key=KEY)
        model_id = (await client.get(f"/api/v1/models/{MODEL}")).json()["id"]
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
        headers = {"Authorization": f"Bearer {KEY}"}
        calls = [
            asyncio.create_task(http.post(f"{url}/v1/chat/completions", json=body, headers=headers))
            for url in (a.url, a.url, a.url, b.url)
        ]

        async def all_in() -> bool:
            await deps.engine_load.scrape()
            load = deps.engine_load.load_of(model_id)
            return load is not None and (load.running, load.waiting) == (2, 2)

        await until(all_in, "the four calls were never all seen (2 running, 2 waiting on the first engine)")
        assert seen[-1] == f"Bearer {KEY}"
        load = deps.engine_load.load_of(model_id)
        assert load is not None
        assert load.ready == 2
        assert 0 < load.kv_cache <= 1
        by_replica = {rid: (s.running, s.waiting) for rid, s in deps.engine_load.samples.items()}
        assert by_replica == {ids[0]: (1, 2), ids[1]: (1, 0)}
        metrics = (await client.get("/metrics")).text
        assert f'orchestrator_engine_requests_waiting{{model="{MODEL}",replica_id="{ids[0]}"}} 2.0' in metrics
        for call in calls:
            (await call).close()


async def test_the_gateway_queue_counts_as_waiting_even_with_no_replica(client: httpx.AsyncClient, deps: Deps) -> None:
    model_id = (await client.post("/api/v1/models", json={"name": MODEL})).json()["id"]
    queued = {MODEL: 3}
    load = EngineLoad(deps.store, deps.upstream, deps.box, queued=lambda m: queued.get(m, 0))
    await load.scrape()
    got = load.load_of(model_id)
    assert got is not None
    assert (got.ready, got.waiting, got.running) == (0, 3, 0)
    queued[MODEL] = 0
    assert load.load_of(model_id) is None  # nothing reported, nothing waiting: no load to act on


async def test_a_silent_replica_has_no_sample_and_is_logged_once_without_its_key(
    client: httpx.AsyncClient, deps: Deps
) -> None:
    async with engine_with_guarded_metrics() as (engine, _):
        [rid] = await make_ready(client, deps, MODEL, engine.chat_url, engine_api_key=KEY)
        assert await deps.engine_load.scrape() == 1
        gauge = f'orchestrator_engine_requests_running{{model="{MODEL}",replica_id="{rid}"}} 0.0'
        assert gauge in (await client.get("/metrics")).text
    # The engine is gone, the replica still READY (its probes have not failed yet).
    with capture_logs() as logs:
        assert await deps.engine_load.scrape() == 0
        assert await deps.engine_load.scrape() == 0
    assert rid not in deps.engine_load.samples
    failed = [e for e in logs if e["event"] == "engine_load.scrape_failed"]
    assert len(failed) == 1
    assert failed[0]["replica_id"] == rid
    assert KEY not in str(logs)
    assert f'replica_id="{rid}"' not in (await client.get("/metrics")).text  # no stale gauge left behind
    model_id = (await client.get(f"/api/v1/models/{MODEL}")).json()["id"]
    assert deps.engine_load.load_of(model_id) is None


async def test_a_deployments_load_is_its_own_replicas_not_a_hand_made_ones(
    client: httpx.AsyncClient, deps: Deps
) -> None:
    async with (
        engine_with_guarded_metrics(max_num_seqs=1, tokens_per_s=10) as (engine, _),
        aiohttp.ClientSession() as http,
    ):
        await make_ready(client, deps, MODEL, engine.chat_url, engine_api_key=KEY)  # by hand, beside the deployment
        model_id = (await client.get(f"/api/v1/models/{MODEL}")).json()["id"]
        policy = {"min_replicas": 1, "max_replicas": 4, "target_waiting": 1, "scale_up_delay_s": 0}
        template = {"create_vm": True, "vm_creation_details": vm_details()}
        r = await client.put(f"/api/v1/models/{model_id}/deployment", json={"template": template, "autoscale": policy})
        assert r.status_code == 200, r.text
        assert await deps.keeper.keep() is True  # its one replica made, PENDING: no VM is made here
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        headers = {"Authorization": f"Bearer {KEY}"}
        calls = [
            asyncio.create_task(http.post(f"{engine.url}/v1/chat/completions", json=body, headers=headers))
            for _ in range(4)
        ]

        async def queued() -> bool:
            await deps.engine_load.scrape()
            load = deps.engine_load.load_of(model_id)
            return load is not None and load.waiting == 3

        await until(queued, "the hand-made engine never had 3 calls waiting")
        # The hand-made replica's line is not the deployment's: its own replica is still starting.
        assert await deps.keeper.keep() is False
        assert (await client.get(f"/api/v1/models/{model_id}/deployment")).json()["desired"] == 1
        for call in calls:
            (await call).close()
