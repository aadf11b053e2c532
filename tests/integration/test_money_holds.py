"""Money and tenancy under a hostile client: a key deleted right after a call keeps its call (disabled, never
deleted), a new key never inherits a deleted key's id, and 100 concurrent calls never take a quota below zero."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from orchestrator.domain.money import UNIT
from orchestrator.runtime.container import Deps
from tests.support.billing import (
    CHAT,
    MODEL,
    PRICE_IN,
    PRICE_OUT,
    connector_key,
    engine,
    priced_model,
)
from tests.support.engines import Engine, engine_in_process
from tests.support.gateway import funded_key, issue_key, make_ready

__all__ = ["engine"]  # the fixture, from tests/support/billing.py, shared with the billing tests

SECRET_PROMPT = {"model": MODEL, "messages": [{"role": "user", "content": "my password is hunter2"}], "max_tokens": 4}


async def test_a_key_deleted_right_after_a_call_is_disabled_and_its_call_stays_its_own(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, engine: Engine
) -> None:
    await make_ready(client, deps, MODEL, engine.chat_url)
    old_id, old = await issue_key(client, "victim")
    answer = await anon_client.post(
        "/v1/chat/completions", json=SECRET_PROMPT, headers={"Authorization": f"Bearer {old}"}
    )
    assert answer.status_code == 200, answer.text
    # At once, before the records job wrote the call: the toolkit's rule (a key with usage is disabled) holds.
    r = await client.post("/api/v1/delete_api_key", json={"user_id": "victim", "api_key_id": old_id})
    assert r.status_code == 200, r.text
    assert "disabled" in r.json()["message"].lower(), r.text
    new_id, new = await issue_key(client, "next")
    assert new_id > old_id
    await deps.records.flush()
    mine = (await anon_client.get("/user/thread/list", headers={"Authorization": f"Bearer {new}"})).json()["data"]
    assert mine["total"] == 0, mine
    theirs = (await client.get(f"/admin/thread/list?key_id={old_id}")).json()["data"]
    assert [t["prompt"] for t in theirs["items"]] == ["my password is hunter2"]


async def test_ids_of_deleted_rows_are_never_given_again(client: httpx.AsyncClient, deps: Deps) -> None:
    first_id, _ = await issue_key(client, "a")
    last_id, _ = await issue_key(client, "b")
    r = await client.post("/api/v1/delete_api_key", json={"user_id": "b", "api_key_id": last_id})
    assert "deleted" in r.json()["message"].lower(), r.text  # never used: really deleted
    again_id, _ = await issue_key(client, "c")
    assert again_id > last_id > first_id
    r = await client.post("/api/v1/models", json={"name": "gone"})
    model_id = r.json()["id"]
    await client.delete(f"/api/v1/models/{model_id}")
    assert (await client.post("/api/v1/models", json={"name": "next"})).json()["id"] > model_id


async def test_a_hundred_concurrent_calls_never_take_a_quota_below_zero(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, engine: Engine
) -> None:
    model_id = await priced_model(client, deps, engine)
    body = len(httpx.Request("POST", "/", json=CHAT).content)
    worst = body * PRICE_IN * UNIT // 10**6 + CHAT["max_tokens"] * PRICE_OUT * UNIT // 10**6  # type: ignore[operator]
    quota = 17 * worst + worst // 2  # room for 17 worst cases
    key_id, key = await connector_key(client, model_id, month_quota=quota / UNIT, balance=0)
    headers = {"Authorization": f"Bearer {key}"}
    answers = await asyncio.gather(
        *(anon_client.post("/v1/chat/completions", json=CHAT, headers=headers) for _ in range(100))
    )
    statuses = [a.status_code for a in answers]
    assert set(statuses) == {200, 402}, statuses
    assert statuses.count(200) >= 17
    await deps.records.flush()
    row = await deps.accounts.key(key_id)
    assert row.month_fee <= quota
    assert row.balance == 0
    fees = [
        a.json()["usage"]["prompt_tokens"] * PRICE_IN * UNIT // 10**6
        + a.json()["usage"]["completion_tokens"] * PRICE_OUT * UNIT // 10**6
        for a in answers
        if a.status_code == 200
    ]
    assert row.total_fee == sum(fees)  # every answered call charged, exactly once


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/v1/completions"])
async def test_a_key_deleted_while_its_call_is_in_flight_is_disabled(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, path: str
) -> None:
    async with engine_in_process("llama3.1", tokens_per_s=20) as slow:  # priced in LlmEndpoint's credit table
        await make_ready(client, deps, "llama3.1", slow.chat_url)
        key_id, key = await funded_key(client, user="inflight")
        await slow.clear_log()
        body = {"model": "llama3.1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
        call = asyncio.create_task(anon_client.post(path, json=body, headers={"Authorization": f"Bearer {key}"}))
        deadline = asyncio.get_running_loop().time() + 10
        while not await slow.chats():  # the call reached the engine: it is in flight, nothing written yet
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        r = await client.post("/api/v1/delete_api_key", json={"user_id": "inflight", "api_key_id": key_id})
        assert "disabled" in r.json()["message"].lower(), r.text
        assert (await call).status_code == 200
        await deps.records.flush()
        assert (await client.get(f"/admin/thread/list?key_id={key_id}")).json()["data"]["total"] == 1


async def test_a_deletion_refused_leaves_the_key_served(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, engine: Engine
) -> None:
    await make_ready(client, deps, MODEL, engine.chat_url)
    key_id, key = await issue_key(client, "owner")
    r = await client.post("/api/v1/delete_api_key", json={"user_id": "someone-else", "api_key_id": key_id})
    assert r.status_code == 404, r.text  # the key is refused while a deletion looks at it, then served again
    answer = await anon_client.post(
        "/v1/chat/completions", json=SECRET_PROMPT, headers={"Authorization": f"Bearer {key}"}
    )
    assert answer.status_code == 200, answer.text
