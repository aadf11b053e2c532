"""LlmEndpoint's `/api/v1/completions`: its keys (raw or Bearer, IP allowlist), its exact refusals, credits from its
rate table taken off the key's balance, whole answers and NDJSON streams, and what the engine is asked."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from decimal import Decimal

import httpx
import pytest

from orchestrator.domain.money import CREDIT, UNIT
from orchestrator.runtime.container import Deps
from tests.support.engines import Engine, engine_in_process
from tests.support.gateway import balance_units, funded_key, make_ready

MODEL = "llama3.1"  # in the seeded rate table: 0.01 cents per input character, 0.02 per output token
PATH = "/api/v1/completions"
QUESTION = "What is the meaning of life?"  # 28 characters
BODY = {"messages": [{"role": "user", "content": QUESTION}], "model": MODEL, "max_tokens": 5}


def credits_for(chars: int, max_tokens: int, rate_in_cents: str, rate_out_cents: str) -> int:
    """The seed's rule, written out: (chars x input rate + max_tokens x output rate) in cents / 0.0001."""
    cents = chars * Decimal(rate_in_cents) + max_tokens * Decimal(rate_out_cents)
    return int(cents / Decimal("0.0001"))


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    async with engine_in_process(MODEL, max_tokens=8, max_model_len=4096) as e:
        yield e


async def test_a_whole_answer_costs_the_seeds_credits_off_the_balance(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, engine: Engine
) -> None:
    await make_ready(client, deps, MODEL, engine.chat_url)
    key_id, key = await funded_key(client, "1")
    before = await balance_units(deps, key_id)
    r = await anon_client.post(PATH, json=BODY, headers={"Authorization": key})  # the raw key, as LlmEndpoint
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True
    assert set(body) == {"success", "response"}
    assert body["response"].split()  # the engine's words
    spent = before - await balance_units(deps, key_id)
    assert spent == credits_for(len(QUESTION), 5, "0.01", "0.02") * CREDIT == 3800 * CREDIT
    # Bearer works too; the system prompt and the assistant's turns cost nothing, only the user's characters.
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "cd"},
        {"role": "user", "content": "efg"},
    ]
    before = await balance_units(deps, key_id)
    r = await anon_client.post(
        PATH, json={**BODY, "messages": messages, "max_tokens": 3}, headers={"Authorization": f"Bearer {key}"}
    )
    assert r.status_code == 200, r.text
    assert before - await balance_units(deps, key_id) == credits_for(5, 3, "0.01", "0.02") * CREDIT


@pytest.mark.parametrize(
    ("model", "rate_in", "rate_out"),
    [("llama3", "0.015", "0.025"), ("mistral-nemo", "0.011", "0.021"), ("owl_t-lite", "0.014", "0.024")],
)
async def test_each_model_is_charged_at_its_own_rates(  # noqa: PLR0917
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, model: str, rate_in: str, rate_out: str
) -> None:
    async with engine_in_process(model, max_tokens=8) as engine:
        await make_ready(client, deps, model, engine.chat_url)
        key_id, key = await funded_key(client, "1")
        before = await balance_units(deps, key_id)
        r = await anon_client.post(PATH, json={**BODY, "model": model, "max_tokens": 7}, headers={"Authorization": key})
        assert r.status_code == 200, r.text
        assert before - await balance_units(deps, key_id) == credits_for(28, 7, rate_in, rate_out) * CREDIT


async def test_a_stream_is_ndjson_lines_of_role_and_content(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, engine: Engine
) -> None:
    await make_ready(client, deps, MODEL, engine.chat_url)
    key_id, key = await funded_key(client, "1")
    whole = (await anon_client.post(PATH, json=BODY, headers={"Authorization": key})).json()["response"]
    async with anon_client.stream("POST", PATH, json={**BODY, "stream": True}, headers={"Authorization": key}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/x-ndjson"
        lines = [line async for line in r.aiter_lines() if line]
    chunks = [json.loads(line) for line in lines]
    assert len(chunks) == 5  # one line per generated token
    assert all(set(c) == {"role", "content"} and c["role"] == "assistant" for c in chunks)
    assert "".join(c["content"] for c in chunks) == whole  # the engine is deterministic
    assert await balance_units(deps, key_id) == UNIT - 2 * 3800 * CREDIT


async def test_num_context_and_output_format_reach_the_engine(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, engine: Engine
) -> None:
    await make_ready(client, deps, MODEL, engine.chat_url)
    _, key = await funded_key(client, "1")
    body = {**BODY, "num_context": 4, "output_format": "json", "temperature": 0.2}
    r = await anon_client.post(PATH, json=body, headers={"Authorization": key})
    assert r.status_code == 200, r.text
    assert isinstance(json.loads(r.json()["response"]), dict)  # JSON output was asked for and given
    sent = (await engine.chats())[-1]["body"]
    assert isinstance(sent, dict)
    assert sent["truncate_prompt_tokens"] == 4
    assert sent["response_format"] == {"type": "json_object"}
    assert sent["temperature"] == 0.2
    assert sent["max_tokens"] == 5
    # The defaults when absent: 0.7, the engine's own context (no truncation asked), plain text.
    await anon_client.post(PATH, json=BODY, headers={"Authorization": key})
    sent = (await engine.chats())[-1]["body"]
    assert isinstance(sent, dict)
    assert sent["temperature"] == 0.7
    assert "truncate_prompt_tokens" not in sent
    assert "response_format" not in sent


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "Authorization header required"),
        ({"Authorization": "sk-not-a-key"}, "Invalid API key"),
        ({"Authorization": "Bearer sk-not-a-key"}, "Invalid API key"),
    ],
)
async def test_keys_are_refused_with_llmendpoints_words(
    anon_client: httpx.AsyncClient, headers: dict[str, str], message: str
) -> None:
    r = await anon_client.post(PATH, json=BODY, headers=headers)
    assert r.status_code == 401
    assert r.json() == {"success": False, "message": message}


async def test_a_key_with_an_ip_allowlist_is_refused_elsewhere(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, engine: Engine
) -> None:
    await make_ready(client, deps, MODEL, engine.chat_url)
    _, outside = await funded_key(client, "1", allowed_ips=["10.1.2.3", "192.168.0.0/24"])
    _, inside = await funded_key(client, "1", allowed_ips=["127.0.0.0/8"])  # the test client is 127.0.0.1
    r = await anon_client.post(PATH, json=BODY, headers={"Authorization": outside})
    assert (r.status_code, r.json()) == (401, {"success": False, "message": "Unauthorized IP address"})
    r = await anon_client.post("/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {outside}"})
    assert (r.status_code, r.json()["error"]["message"]) == (401, "Unauthorized IP address")  # on every surface
    assert (await anon_client.post(PATH, json=BODY, headers={"Authorization": inside})).status_code == 200
    r = await client.post("/api/v1/generate_api_key", json={"user_id": "x", "allowed_ips": ["10.0.0.300"]})
    assert r.status_code == 400
    assert "10.0.0.300" in r.text


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": MODEL, "max_tokens": 5}, "messages, model, max_tokens, and temperature are required"),
        ({"messages": BODY["messages"], "max_tokens": 5}, "messages, model, max_tokens, and temperature are required"),
        ({"messages": BODY["messages"], "model": MODEL}, "messages, model, max_tokens, and temperature are required"),
        ({**BODY, "max_tokens": "many"}, "Invalid request"),
        ({**BODY, "max_tokens": 0}, "Invalid request"),
        ({**BODY, "temperature": 9}, "Invalid request"),
        ({**BODY, "messages": []}, "Invalid request"),
        ({**BODY, "messages": [{"role": "robot", "content": "x"}]}, "Invalid request"),
        ({**BODY, "output_format": "xml"}, "Invalid request"),
        ({**BODY, "num_context": -1}, "Invalid request"),
        ([1, 2], "Invalid request"),
        ({**BODY, "model": "no-such-model"}, "Model pricing not found"),
    ],
)
async def test_bad_requests_get_llmendpoints_400s(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, body: object, message: str
) -> None:
    _, key = await funded_key(client, "1")
    r = await anon_client.post(PATH, json=body, headers={"Authorization": key})
    assert r.status_code == 400
    assert (r.json()["success"], r.json()["message"]) == (False, message)
    r = await anon_client.post(PATH, content=b"{not json", headers={"Authorization": key})
    assert (r.status_code, r.json()["message"]) == (400, "Invalid request")


async def test_a_balance_short_of_the_cost_is_a_402_and_nothing_is_called(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, engine: Engine
) -> None:
    await make_ready(client, deps, MODEL, engine.chat_url)
    cost_usd = Decimal(3800 * CREDIT) / UNIT  # what BODY costs
    _, short = await funded_key(client, str(cost_usd - Decimal("0.000001")))
    r = await anon_client.post(PATH, json=BODY, headers={"Authorization": short})
    assert (r.status_code, r.json()) == (402, {"success": False, "message": "Insufficient credits"})
    assert await engine.chats() == []
    _, exact = await funded_key(client, str(cost_usd))
    assert (await anon_client.post(PATH, json=BODY, headers={"Authorization": exact})).status_code == 200
    # Spent down to zero: the next call is refused before anything is flushed.
    r = await anon_client.post(PATH, json=BODY, headers={"Authorization": exact})
    assert r.status_code == 402


async def test_concurrent_calls_cannot_spend_the_same_credits(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, engine: Engine
) -> None:
    await make_ready(client, deps, MODEL, engine.chat_url)
    key_id, key = await funded_key(client, str(Decimal(3800 * CREDIT) / UNIT))  # enough for one call
    answers = await asyncio.gather(
        *(anon_client.post(PATH, json=BODY, headers={"Authorization": key}) for _ in range(5))
    )
    assert sorted(r.status_code for r in answers) == [200, 402, 402, 402, 402]
    assert await balance_units(deps, key_id) == 0


async def test_no_host_is_llmendpoints_max_attempts(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps
) -> None:
    key_id, key = await funded_key(client, "1")
    r = await anon_client.post(PATH, json=BODY, headers={"Authorization": key})  # priced, but no replica at all
    assert (r.status_code, r.json()["message"]) == (400, "Max attempts reached - no available hosts")
    async with engine_in_process(MODEL) as first, engine_in_process(MODEL) as second:
        await make_ready(client, deps, MODEL, first.chat_url, second.chat_url)
    # Both engines are gone now: every host refuses the connection.
    r = await anon_client.post(PATH, json=BODY, headers={"Authorization": key})
    assert (r.status_code, r.json()["message"]) == (400, "Max attempts reached - no available hosts")
    assert await balance_units(deps, key_id) == UNIT


async def test_a_failed_call_costs_nothing(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, engine: Engine
) -> None:
    await make_ready(client, deps, MODEL, engine.chat_url)
    key_id, key = await funded_key(client, "1")
    await engine.set_faults(fail_rate=1.0)
    r = await anon_client.post(PATH, json=BODY, headers={"Authorization": key})
    assert (r.status_code, r.json()["message"]) == (502, "The model's host failed.")
    assert await balance_units(deps, key_id) == UNIT


@pytest.mark.parametrize(
    "raw",
    [b'{"model": "\xff", "messages": [], "max_tokens": 1}', b'{"model": "\\udcff"}', b"[" * 100_000 + b"]" * 100_000],
    ids=["not-utf8", "lone-surrogate", "nested-too-deep"],
)
async def test_undecodable_bodies_are_400s_on_the_raw_routes(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, raw: bytes
) -> None:
    _, key = await funded_key(client, "0")
    r = await anon_client.post(PATH, content=raw, headers={"Authorization": key})
    assert (r.status_code, r.json()["message"]) == (400, "Invalid request")
    for path in ("/v1/chat/completions", "/queue/chat/completions"):
        r = await anon_client.post(path, content=raw, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
