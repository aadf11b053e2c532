"""The gateway with the official openai SDK as the client and real engine simulators over real sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import openai
import pytest

from orchestrator.runtime.container import Deps
from tests.support.engines import Engine, engine_in_process
from tests.support.gateway import issue_key, make_ready, openai_client

MODEL = "llama-3.1-8b"


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    async with engine_in_process(MODEL, api_key="engine-only-secret", max_tokens=8) as e:
        yield e


@pytest.fixture
async def sdk(
    client: httpx.AsyncClient, transport: httpx.ASGITransport, deps: Deps, engine: Engine
) -> openai.AsyncOpenAI:
    await make_ready(client, deps, MODEL, engine.chat_url, engine_api_key="engine-only-secret")
    _, key = await issue_key(client)
    return openai_client(transport, key)


async def test_chat_non_stream_with_usage(sdk: openai.AsyncOpenAI) -> None:
    answer = await sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello there"}])
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.content
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 8
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 8


async def test_chat_stream_with_usage(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello"}],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=5,
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5


async def test_stream_without_usage_gets_no_usage_chunk_but_is_billed(
    sdk: openai.AsyncOpenAI, client: httpx.AsyncClient, deps: Deps
) -> None:
    stream = await sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=4
    )
    chunks = [c async for c in stream]
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert await deps.records.flush() == 1
    [row] = (await client.get("/api/v1/tables/metric")).json()["data"]
    assert (row["completion_tokens"], row["model"], row["status_code"]) == (4, MODEL, 200)
    assert row["prompt_tokens"] > 0
    assert isinstance(row["created"], int)


async def test_a_stream_the_engine_refuses_in_an_error_event_is_recorded_without_tokens(
    sdk: openai.AsyncOpenAI, client: httpx.AsyncClient, deps: Deps
) -> None:
    """vLLM checks logprobs only once the stream has begun: a 200, then an error event and no text."""
    stream = await sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True, logprobs=True, top_logprobs=21
    )
    with pytest.raises(openai.APIError, match="greater than max allowed: 20"):
        async for _ in stream:
            pass
    assert await deps.records.flush() == 1
    [row] = (await client.get("/api/v1/tables/metric")).json()["data"]
    assert (row["prompt_tokens"], row["completion_tokens"], row["status_code"]) == (0, 0, 200)


async def test_completions_stream_and_not(sdk: openai.AsyncOpenAI) -> None:
    answer = await sdk.completions.create(model=MODEL, prompt="Once upon", max_tokens=3)
    assert answer.object == "text_completion"
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 3
    stream = await sdk.completions.create(model=MODEL, prompt="Once upon", max_tokens=3, stream=True)
    pieces = [c.choices[0].text for c in [c async for c in stream] if c.choices]
    assert len(pieces) >= 3


async def test_models_lists_live_models(sdk: openai.AsyncOpenAI) -> None:
    models = await sdk.models.list()
    assert [m.id for m in models.data] == [MODEL]


async def test_bad_key_raises_authentication_error(sdk: openai.AsyncOpenAI, transport: httpx.ASGITransport) -> None:
    bad = openai_client(transport, "sk-not-a-key")
    with pytest.raises(openai.AuthenticationError):
        await bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        await bad.models.list()


@pytest.mark.parametrize("header", ["Authorization", "API-Key", "x-api-key"])
async def test_key_headers(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, sdk: openai.AsyncOpenAI, header: str
) -> None:
    _, key = await issue_key(client, "bob")
    value = f"Bearer {key}" if header == "Authorization" else key
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    r = await anon_client.post("/v1/chat/completions", json=body, headers={header: value})
    assert r.status_code == 200, r.text


async def test_disabled_key_is_refused_at_once(
    client: httpx.AsyncClient, transport: httpx.ASGITransport, deps: Deps, sdk: openai.AsyncOpenAI
) -> None:
    key_id, key = await issue_key(client, "carol")
    mine = openai_client(transport, key)
    await mine.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    await deps.records.flush()
    r = await client.post("/api/v1/delete_api_key", json={"user_id": "carol", "api_key_id": key_id})
    assert r.json() == {"message": "API key disabled successfully"}
    with pytest.raises(openai.AuthenticationError):
        await mine.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])


async def test_unknown_model_is_400_with_litellm_message(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        await sdk.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert "Invalid model name passed in model=nope" in str(e.value)


async def test_known_model_without_ready_replica_is_503_with_retry_after(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, sdk: openai.AsyncOpenAI
) -> None:
    await client.post("/api/v1/models", json={"name": "idle"})
    _, key = await issue_key(client, "dave")
    body = {"model": "idle", "messages": [{"role": "user", "content": "x"}]}
    r = await anon_client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 503
    assert r.headers["retry-after"] == "5"
    assert r.json()["error"]["code"] == "503"
    r = await anon_client.post("/api/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    assert (r.status_code, r.json()) == (400, {"error": "No Replica available / ready."})


@pytest.mark.parametrize(
    "path",
    [
        "/v1/chat/completions",
        "/chat/completions",
        f"/engines/{MODEL}/chat/completions",
        f"/openai/deployments/{MODEL}/chat/completions",
        "/api/v1/chat/completions",
    ],
)
async def test_every_chat_route(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, sdk: openai.AsyncOpenAI, path: str
) -> None:
    _, key = await issue_key(client, "erin")
    # The model in the path wins over the body's.
    model = "ignored" if "/engines/" in path or "/deployments/" in path else MODEL
    body = {"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    r = await anon_client.post(path, json=body, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == MODEL
    assert r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    "path",
    ["/v1/completions", "/completions", f"/engines/{MODEL}/completions", f"/openai/deployments/{MODEL}/completions"],
)
async def test_every_completions_route(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, sdk: openai.AsyncOpenAI, path: str
) -> None:
    _, key = await issue_key(client, "frank")
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    r = await anon_client.post(path, json=body, headers={"x-api-key": key})
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "text_completion"


async def test_toolkit_route_rate_limit_body_is_exact(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, sdk: openai.AsyncOpenAI
) -> None:
    _, key = await issue_key(client, "gina", rpm=2)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    headers = {"Authorization": f"Bearer {key}"}
    for _ in range(2):
        assert (await anon_client.post("/api/v1/chat/completions", json=body, headers=headers)).status_code == 200
    r = await anon_client.post("/api/v1/chat/completions", json=body, headers=headers)
    assert (r.status_code, r.json()) == (
        429,
        {
            "error": "rate_limit_exceeded",
            "message": "Rate limit exceeded: allowed 2 requests per minute.",
            "allowed_rpm": 2,
        },
    )
    r = await anon_client.post("/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 429
    assert r.json()["error"]["message"] == "Rate limit exceeded: allowed 2 requests per minute."


async def test_toolkit_route_forces_usage_on_streams_and_validates_like_the_toolkit(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, sdk: openai.AsyncOpenAI, engine: Engine, deps: Deps
) -> None:
    _, key = await issue_key(client, "hank")
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True, "max_tokens": 2}
    await engine.clear_log()
    r = await anon_client.post("/api/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 200
    # The engine is asked for usage; the toolkit's client sees only events with choices, and no [DONE].
    [sent] = await engine.chats()
    assert sent["body"]["stream_options"] == {"include_usage": True}
    assert '"choices":[]' not in r.text
    assert "[DONE]" not in r.text
    assert await deps.records.flush() == 1
    [row] = (await client.get("/api/v1/tables/metric")).json()["data"]
    assert row["completion_tokens"] == 2
    for bad, errors in (
        ({"model": MODEL, "messages": []}, {"messages": ["Shorter than minimum length 1."]}),
        (
            {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
            {"messages": {"0": {"role": ["Must be one of: system, user, assistant."]}}},
        ),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 3},
            {"temperature": ["Must be greater than or equal to 0.0 and less than or equal to 2.0."]},
        ),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            {"top_logprobs": ["top_logprobs can only be set if logprobs is True"]},
        ),
    ):
        r = await anon_client.post("/api/v1/chat/completions", json=bad, headers=headers)
        assert (r.status_code, r.json()) == (400, {"errors": errors}), bad
    r = await anon_client.post(
        "/api/v1/chat/completions",
        json={"model": "zzz", "messages": [{"role": "user", "content": "x"}]},
        headers=headers,
    )
    assert (r.status_code, r.json()) == (400, {"error": "Invalid Model"})
    r = await anon_client.post("/api/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
    assert (r.status_code, r.json()) == (401, {"error": "Invalid API key."})


async def test_malformed_bodies_are_400_in_the_openai_envelope(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, sdk: openai.AsyncOpenAI
) -> None:
    _, key = await issue_key(client, "ivy")
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    for raw in (b"{", b"[]", b'{"model": 5}', b'{"model": "m", "messages": "x"}', b'{"model":"m","prompt":null}'):
        r = await anon_client.post("/v1/chat/completions", content=raw, headers=headers)
        assert r.status_code == 400, raw
        assert r.json()["error"]["type"] == "invalid_request_error"
    r = await anon_client.post("/v1/chat/completions", content=b"x" * (5 * 1024 * 1024), headers=headers)
    assert r.status_code == 413
    r = await anon_client.get("/v1/chat/completions", headers=headers)
    assert r.status_code == 405


async def test_the_engine_key_is_sent_never_the_clients(engine: Engine, sdk: openai.AsyncOpenAI) -> None:
    # The engine refuses anything but its own key: a 200 through the gateway shows the swap.
    async with httpx.AsyncClient() as direct:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
        assert (
            await direct.post(engine.chat_url, json=body, headers={"Authorization": "Bearer sk-x"})
        ).status_code == 401
    answer = await sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert answer.choices


async def test_engine_key_is_never_shown(client: httpx.AsyncClient, sdk: openai.AsyncOpenAI) -> None:
    for path in ("/api/v1/tables/replicas", "/api/v1/models/1/replicas", "/api/v1/replicas/1"):
        assert "engine-only-secret" not in (await client.get(path)).text


async def test_gateway_metrics_are_exported(client: httpx.AsyncClient, sdk: openai.AsyncOpenAI) -> None:
    await sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    text = (await client.get("/metrics")).text
    assert 'gateway_requests_total{kind="chat",status="200"} 1.0' in text
    assert "gateway_request_duration_seconds_bucket" in text
    assert 'orchestrator_replicas{status="READY"} 1.0' in text
    assert "gateway_inflight_requests 0.0" in text
