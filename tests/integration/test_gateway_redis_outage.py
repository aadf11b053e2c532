"""The gateway with `ORCH_REDIS_URL` on a Redis that goes away and comes back: calls are answered under the
instance's own limits meanwhile (never a 500), the outage is logged once, and the shared limits apply again after."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs

from orchestrator.domain.money import UNIT
from orchestrator.platform.settings import Settings
from orchestrator.runtime.container import Deps
from tests.support.billing import CHAT, PRICE_IN, PRICE_OUT, connector_key, engine, priced_model
from tests.support.engines import Engine
from tests.support.gateway import issue_key, make_ready
from tests.support.redis import RedisServer
from tests.support.settings import instance_settings

__all__ = ["engine"]  # the fixture, from tests/support/billing.py


@pytest.fixture
def settings(tmp_path: Path, database_url: str, own_redis: RedisServer) -> Settings:
    return instance_settings(tmp_path / "state", database_url).model_copy(update={"redis_url": own_redis.url})


async def test_a_keys_rate_limit_through_a_redis_outage(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, engine: Engine, own_redis: RedisServer
) -> None:
    await make_ready(client, deps, engine.model, engine.chat_url)
    _, key = await issue_key(client, "u", rpm=3)
    headers = {"Authorization": f"Bearer {key}"}

    async def statuses(n: int) -> list[int]:
        return [
            (await anon_client.post("/v1/chat/completions", json=CHAT, headers=headers)).status_code for _ in range(n)
        ]

    assert await statuses(4) == [200, 200, 200, 429]
    with capture_logs() as logs:
        own_redis.pause()
        assert await statuses(2) == [429, 429]  # this instance's own window, which counted its three calls
        own_redis.resume()  # empty: every window starts again
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while (await statuses(1)) != [200]:  # Redis is tried again a second after it failed
            assert loop.time() < deadline, "the limits never went back to Redis"
            await asyncio.sleep(0.05)
    # The limits' outage, once (on SQLite the change feed, which listens over Redis too, says its own).
    limits = [e["event"] for e in logs if e["log_level"] == "warning" and e["event"].startswith("redis.")]
    assert limits == ["redis.unreachable", "redis.reachable"]
    assert not [e for e in logs if e["log_level"] in {"error", "critical"}], logs
    assert await statuses(3) == [200, 200, 429]  # the window in Redis: three, the one above included


async def test_a_metered_keys_holds_through_a_redis_outage(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, engine: Engine, own_redis: RedisServer
) -> None:
    model_id = await priced_model(client, deps, engine)
    body = len(httpx.Request("POST", "/", json=CHAT).content)
    worst = body * PRICE_IN * UNIT // 10**6 + CHAT["max_tokens"] * PRICE_OUT * UNIT // 10**6  # type: ignore[operator]
    _, key = await connector_key(client, model_id, month_quota=0, balance=(3 * worst + worst // 2) / UNIT)
    headers = {"Authorization": f"Bearer {key}"}
    await engine.set_faults(hang=True)  # the calls stay in flight, holding their worst cases

    async def attempt() -> int:
        return (await anon_client.post("/v1/chat/completions", json=CHAT, headers=headers)).status_code

    held = [asyncio.ensure_future(attempt()) for _ in range(2)]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while len(await engine.chats()) < 2:
        assert loop.time() < deadline, "the calls never reached the engine"
        await asyncio.sleep(0.02)
    own_redis.pause()
    third: asyncio.Future[int] | None = None
    try:
        # Held here as well as in Redis: the third worst case fits, a fourth does not, and nothing is a 500.
        third = asyncio.ensure_future(attempt())
        while len(await engine.chats()) < 3:
            assert loop.time() < deadline, "the third call never reached the engine"
            await asyncio.sleep(0.02)
        assert await attempt() == 402
    finally:
        calls = [*held, *([third] if third is not None else [])]
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        await engine.set_faults(hang=False)
