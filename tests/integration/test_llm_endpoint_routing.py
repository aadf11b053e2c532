"""Moonshot's llm_endpoints as external replicas: the gateway routes a model named by the endpoint's id to its URI
with its token, merges its params into requests, and holds calls to its max_concurrency and max_calls_per_second."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from orchestrator.runtime.container import Deps
from tests.support.engines import Engine, engine_in_process
from tests.support.gateway import issue_key

UPSTREAM_MODEL = "upstream-model"
TOKEN = "ep-secret-token-0123456789"


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    # Slow enough that calls overlap; it refuses any key but the endpoint's token.
    async with engine_in_process(UPSTREAM_MODEL, api_key=TOKEN, max_tokens=4, ttft_s=0.15) as e:
        yield e


async def add_endpoint(client: httpx.AsyncClient, engine: Engine, **fields: object) -> None:
    body = {
        "name": "My EP_1",
        "connector_type": "openai-compatible",
        "uri": engine.chat_url,
        "token": TOKEN,
        "max_calls_per_second": 0,
        "max_concurrency": 0,
        "params": {"model": UPSTREAM_MODEL, "temperature": 0.3, "max_tokens": 2},
        **fields,
    }
    r = await client.post("/v1/llm_endpoints", json=body)
    assert r.json() == {"message": "Endpoint added successfully"}, r.text


async def test_an_endpoint_is_a_model_the_gateway_routes_to(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, engine: Engine
) -> None:
    await add_endpoint(client, engine)
    _, key = await issue_key(client)
    headers = {"Authorization": f"Bearer {key}"}
    models = (await anon_client.get("/v1/models", headers=headers)).json()["data"]
    assert "my-ep-1" in [m["id"] for m in models]
    body = {"model": "my-ep-1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    r = await anon_client.post("/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 200, r.text  # the engine took the endpoint's token: the client's key never reaches it
    assert r.json()["usage"]["completion_tokens"] == 3
    sent = (await engine.log())["requests"][-1]["body"]  # type: ignore[index]
    assert sent["model"] == UPSTREAM_MODEL  # the endpoint's params name the model at the external API
    assert sent["temperature"] == 0.3  # a default merged in
    assert sent["max_tokens"] == 3  # the request's own value wins over the default
    # Listed with its token masked; deleted, the model is gone from the gateway at once.
    listed = (await client.get("/v1/llm_endpoints")).json()
    assert [(e["id"], e["token"]) for e in listed] == [("my-ep-1", "********")]
    assert TOKEN not in (await client.get("/v1/llm_endpoints")).text
    assert (await client.delete("/v1/llm_endpoints/My EP_1")).json() == {"message": "Endpoint deleted successfully"}
    r = await anon_client.post("/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 400
    assert "my-ep-1" in r.json()["error"]["message"]


async def test_max_concurrency_holds_calls_at_the_endpoint(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, engine: Engine
) -> None:
    await add_endpoint(client, engine, max_concurrency=2)
    _, key = await issue_key(client, rpm=10_000)
    body = {"model": "my-ep-1", "messages": [{"role": "user", "content": "hi"}]}
    answers = await asyncio.gather(
        *(
            anon_client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            for _ in range(6)
        )
    )
    assert [r.status_code for r in answers] == [200] * 6  # calls wait at the endpoint, none is refused
    log = await engine.log()
    assert len(log["requests"]) == 6  # type: ignore[arg-type]
    assert log["peak_running"] == 2  # never more than two at once, and the two slots were used


async def test_max_calls_per_second_spaces_the_calls(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, engine: Engine
) -> None:
    await add_endpoint(client, engine, max_calls_per_second=20)
    _, key = await issue_key(client, rpm=10_000)
    body = {"model": "my-ep-1", "messages": [{"role": "user", "content": "hi"}]}
    answers = await asyncio.gather(
        *(
            anon_client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            for _ in range(6)
        )
    )
    assert [r.status_code for r in answers] == [200] * 6
    log = await engine.log()
    received = sorted(r["received"] for r in log["requests"])  # type: ignore[attr-defined]
    # Six calls at most 20 per second: the last started at least 5 x 50 ms after the first (less transit jitter).
    assert received[-1] - received[0] >= 5 * 0.05 - 0.03
    assert log["peak_running"] > 1  # spacing is not serialising: calls still overlap at the engine


async def test_an_unreachable_endpoint_is_a_502_not_a_health_report(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient
) -> None:
    async with engine_in_process(UPSTREAM_MODEL) as gone:
        await add_endpoint(client, gone)
    _, key = await issue_key(client)
    body = {"model": "my-ep-1", "messages": [{"role": "user", "content": "hi"}]}
    r = await anon_client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 502
    assert r.json()["error"]["type"] == "upstream_unreachable"
