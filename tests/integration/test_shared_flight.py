"""Calls in flight counted over every instance through Redis (`ORCH_REDIS_URL`): two whole instances in process on
one PostgreSQL and the session's real redis-server, each with its own catalog, gateway and queues, calling engine
simulators on real sockets. An endpoint's max_concurrency and max_calls_per_second hold over both; a queued call
waits for room left by the other instance's call; a drain waits for a call in flight on the other instance."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.app import create_app
from orchestrator.domain.lifecycle import ReplicaStatus
from orchestrator.fleet.drain import Drain
from orchestrator.fleet.reconcile import reconcile
from orchestrator.runtime.compose import Runtime, build_deps
from orchestrator.runtime.container import Deps
from tests.support.engines import Engine, engine_in_process
from tests.support.gateway import issue_key, make_ready
from tests.support.postgres import PostgresServer
from tests.support.redis import RedisServer
from tests.support.settings import ADMIN_KEY, instance_settings

pytestmark = pytest.mark.postgres

S = ReplicaStatus
MODEL = "flight-model"


class Instance:
    def __init__(self, deps: Deps, admin: httpx.AsyncClient, anon: httpx.AsyncClient) -> None:
        self.deps, self.admin, self.anon = deps, admin, anon

    async def chat(self, key: str, model: str, path: str = "/v1/chat/completions", **extra: Any) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
        return await self.anon.post(path, json=body, headers={"Authorization": f"Bearer {key}"})


@asynccontextmanager
async def instance(state_dir: Path, url: str, redis_url: str | None, namespace: str) -> AsyncIterator[Instance]:
    """A whole server on the shared database and Redis; the test runs its jobs."""
    settings = instance_settings(state_dir, url).model_copy(
        update={"redis_url": redis_url, "deployment": namespace, "queue_slots_per_replica": 1}
    )
    deps = build_deps(settings)
    runtime = Runtime(deps)
    await runtime.start()
    transport = httpx.ASGITransport(app=create_app(runtime))
    admin_headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    try:
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=admin_headers) as admin,
            httpx.AsyncClient(transport=transport, base_url="http://testserver") as anon,
        ):
            yield Instance(deps, admin, anon)
    finally:
        await runtime.stop()


Pair = tuple[Instance, Instance]


@pytest.fixture
async def pair(postgres: PostgresServer, redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[Pair]:
    url, namespace = await postgres.new_database(), RedisServer.new_namespace()
    async with (
        instance(tmp_path / "a", url, redis_server.url, namespace) as a,
        instance(tmp_path / "b", url, redis_server.url, namespace) as b,
    ):
        yield a, b


async def until(condition: Callable[[], Awaitable[bool]], what: str, deadline_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while not await condition():
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def add_endpoint(a: Instance, b: Instance, engine: Engine, **limits: int) -> str:
    body = {"name": "Shared EP", "connector_type": "vllm", "uri": engine.chat_url, "params": {"model": engine.model}}
    body |= {"token": "t", "max_calls_per_second": 0, "max_concurrency": 0}
    r = await a.admin.post("/v1/llm_endpoints", json={**body, **limits})
    assert r.status_code in {200, 201}, r.text
    await b.deps.catalog.reload()  # the change feed does it within milliseconds; the test does not wait for it
    return "shared-ep"


async def test_an_endpoints_max_concurrency_holds_over_both_instances(pair: Pair) -> None:
    a, b = pair
    async with engine_in_process("upstream", ttft_s=0.15, max_tokens=2) as engine:
        model = await add_endpoint(a, b, engine, max_concurrency=2)
        _, key = await issue_key(a.admin, rpm=10_000)
        await b.deps.catalog.reload()
        answers = await asyncio.gather(*(inst.chat(key, model) for inst in (a, b) * 4))
        assert [r.status_code for r in answers] == [200] * 8  # calls wait at the gate, none is refused
        log = await engine.log()
    assert len(log["requests"]) == 8
    assert log["peak_running"] == 2  # two instances, four calls each at once, never more than two at the engine


async def test_an_endpoints_calls_per_second_are_spaced_over_both_instances(pair: Pair) -> None:
    a, b = pair
    async with engine_in_process("upstream", max_tokens=2) as engine:
        model = await add_endpoint(a, b, engine, max_calls_per_second=5)
        _, key = await issue_key(a.admin, rpm=10_000)
        await b.deps.catalog.reload()
        answers = await asyncio.gather(*(inst.chat(key, model) for inst in (a, b) * 3))
        assert [r.status_code for r in answers] == [200] * 6
        received = sorted(r["received"] for r in (await engine.log())["requests"])
    # Six starts at five a second over both: the last 5 x 200 ms after the first (each instance spacing its own three
    # alone would take 400 ms); a lower bound, with room for the transit of a loaded machine.
    assert received[-1] - received[0] >= 0.8


async def test_a_queued_call_waits_for_the_room_the_other_instance_holds(pair: Pair) -> None:
    a, b = pair
    async with engine_in_process(MODEL, tokens_per_s=20) as engine:  # 16 tokens: a stream of about 0.8 s
        await make_ready(a.admin, a.deps, MODEL, engine.chat_url)
        await b.deps.catalog.reload()
        _, key = await issue_key(a.admin, rpm=10_000)
        await b.deps.catalog.reload()
        holding = asyncio.create_task(a.chat(key, MODEL, stream=True))  # the replica's one slot, taken on `a`

        async def running() -> bool:
            return len(await engine.chats()) == 1

        await until(running, "the first call to reach the engine")

        async def seen_by_b() -> bool:  # `a` writes its count a few milliseconds after the call's start
            return b.deps.catalog.in_flight(b.deps.catalog.pools[MODEL]) == [1]

        await until(seen_by_b, "`b` to see the call in flight on `a`")
        queued = asyncio.create_task(b.chat(key, MODEL, path="/queue/chat/completions", max_tokens=2))

        async def waiting() -> bool:
            return b.deps.queues.waiting(MODEL) == 1

        await until(waiting, "the queued call to wait on `b`")
        assert len(await engine.chats()) == 1  # `b` runs nothing itself, yet the replica has no room
        first, second = await asyncio.gather(holding, queued)
        assert (first.status_code, second.status_code) == (200, 200)
        chats = await engine.chats()
    assert len(chats) == 2
    assert chats[1]["received"] >= chats[0]["finished"]  # let through once the first call had ended


async def test_a_drain_waits_for_a_call_in_flight_on_the_other_instance(pair: Pair) -> None:
    a, b = pair
    async with engine_in_process(MODEL, tokens_per_s=10) as engine:  # 16 tokens: a stream of about 1.6 s
        [rid] = await make_ready(a.admin, a.deps, MODEL, engine.chat_url)
        _, key = await issue_key(a.admin, rpm=10_000)
        await b.deps.catalog.reload()
        stream = asyncio.create_task(b.chat(key, MODEL, stream=True))  # on `b`, which runs no jobs

        async def running() -> bool:
            return len(await engine.chats()) == 1

        await until(running, "the call to reach the engine")

        async def seen_by_a() -> bool:  # `b` writes its count a few milliseconds after the call's start
            return a.deps.catalog.in_flight(a.deps.catalog.pools[MODEL]) == [1]

        await until(seen_by_a, "`a` to see the call in flight on `b`")
        assert (await a.admin.delete(f"/api/v1/replicas/{rid}")).status_code in {200, 204}
        drain = Drain(a.deps.catalog, timeout_s=60)  # the leader's reconcile job, as the scheduler calls it
        await reconcile(a.deps.store, None, drain)
        assert (await a.deps.store.replica(rid)).status == S.DRAINING  # type: ignore[union-attr]
        answer = await stream
        assert answer.status_code == 200
        assert "[DONE]" in answer.text  # the call finished whole

        async def moved_on() -> bool:
            await reconcile(a.deps.store, None, drain)
            replica = await a.deps.store.replica(rid)
            return replica is not None and replica.status != S.DRAINING

        await until(moved_on, "the drain to end once the call had")
    detail = await a.deps.replicas.detail(rid)
    [event] = [e for e in detail.events if e.from_status == S.DRAINING]
    assert event.reason == "drained"
