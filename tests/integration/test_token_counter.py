"""LiteLLM's `POST /utils/token_counter` through the whole app: OpenAI's rule, a READY replica's own count
(a real engine simulator on a real socket), the fallback when that replica fails, and bad calls as 4xx in
OpenAI's envelope."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from aiohttp import web

from orchestrator.enginesim.server import SimConfig, build_app
from orchestrator.gateway.tokens import IMAGE_TOKENS
from orchestrator.runtime.container import Deps
from tests.support.gateway import issue_key, make_ready

MODEL = "llama-3.1-8b"
ENGINE_KEY = "engine-only-secret"
URL = "/utils/token_counter"
HELLO = [{"role": "user", "content": "hello"}]


@dataclass
class RecordingEngine:
    """An engine simulator that notes the Authorization header of every `/tokenize` it answers."""

    url: str
    runner: web.AppRunner
    tokenize_auth: list[str | None] = field(default_factory=list)

    @property
    def chat_url(self) -> str:
        return f"{self.url}/v1/chat/completions"

    async def tokenize(self, body: dict[str, Any]) -> int:
        """What the simulator itself answers to `body`, asked directly."""
        async with httpx.AsyncClient() as c:
            r = await c.post(f"{self.url}/tokenize", json=body)
        r.raise_for_status()
        self.tokenize_auth.pop()  # not one the gateway made
        return int(r.json()["count"])


@asynccontextmanager
async def recording_engine() -> AsyncIterator[RecordingEngine]:
    seen: list[str | None] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/tokenize":
            seen.append(request.headers.get("Authorization"))
        response: web.StreamResponse = await handler(request)
        return response

    app = build_app(SimConfig(model=MODEL, port=0, api_key=ENGINE_KEY))
    app.middlewares.append(record)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield RecordingEngine(f"http://127.0.0.1:{runner.addresses[0][1]}", runner, seen)
    finally:
        await runner.cleanup()


@pytest.fixture
async def key(client: httpx.AsyncClient) -> str:
    return (await issue_key(client, "counter"))[1]


@pytest.fixture
async def engine(client: httpx.AsyncClient, deps: Deps) -> AsyncIterator[RecordingEngine]:
    """MODEL with one READY replica on a recording engine simulator."""
    async with recording_engine() as e:
        await make_ready(client, deps, MODEL, e.chat_url, engine_api_key=ENGINE_KEY)
        yield e


async def count(anon_client: httpx.AsyncClient, key: str, body: Any) -> httpx.Response:
    return await anon_client.post(URL, json=body, headers={"Authorization": f"Bearer {key}"})


@pytest.mark.parametrize("header", ["Authorization", "API-Key", "x-api-key"])
async def test_openai_rule_for_a_model_without_replicas(anon_client: httpx.AsyncClient, key: str, header: str) -> None:
    value = f"Bearer {key}" if header == "Authorization" else key
    r = await anon_client.post(URL, json={"model": "gpt-4", "messages": HELLO}, headers={header: value})
    assert r.status_code == 200, r.text
    assert r.json() == {
        "total_tokens": 8,
        "request_model": "gpt-4",
        "model_used": "gpt-4",
        "tokenizer_type": "openai_tokenizer",
    }


async def test_openai_rule_for_prompts_names_and_parts(anon_client: httpx.AsyncClient, key: str) -> None:
    async def total(body: dict[str, Any]) -> int:
        r = await count(anon_client, key, {"model": "gpt-4", **body})
        assert r.status_code == 200, r.text
        assert r.json()["tokenizer_type"] == "openai_tokenizer"
        return int(r.json()["total_tokens"])

    assert await total({"prompt": "hello world"}) == 2
    assert await total({"prompt": ["hello", "hello world"]}) == 3
    assert await total({"messages": [{"role": "user", "content": "hello", "name": "hello"}]}) == 10
    parts = [{"type": "text", "text": "hello"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    assert await total({"messages": [{"role": "user", "content": parts}]}) == 8 + IMAGE_TOKENS


async def test_a_ready_replica_counts_with_its_own_key(
    anon_client: httpx.AsyncClient, key: str, engine: RecordingEngine
) -> None:
    r = await count(anon_client, key, {"model": MODEL, "messages": HELLO})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["tokenizer_type"], body["request_model"], body["model_used"]) == ("vllm", MODEL, MODEL)
    assert engine.tokenize_auth == [f"Bearer {ENGINE_KEY}"]  # the replica's key, never the client's
    assert body["total_tokens"] == await engine.tokenize({"model": MODEL, "messages": HELLO})
    assert body["total_tokens"] != 8  # the simulator's tokenizer is not cl100k: the count did come from it

    r = await count(anon_client, key, {"model": MODEL, "prompt": "the quick brown fox"})
    assert r.json()["tokenizer_type"] == "vllm"
    assert r.json()["total_tokens"] == await engine.tokenize({"model": MODEL, "prompt": "the quick brown fox"})

    r = await count(anon_client, key, {"model": MODEL, "prompt": ["a b", "c"]})  # vLLM takes one string a call
    separately = await engine.tokenize({"model": MODEL, "prompt": "a b"}) + await engine.tokenize(
        {"model": MODEL, "prompt": "c"}
    )
    assert (r.json()["tokenizer_type"], r.json()["total_tokens"]) == ("vllm", separately)


async def test_images_are_not_sent_to_the_replica(
    anon_client: httpx.AsyncClient, key: str, engine: RecordingEngine
) -> None:
    parts = [{"type": "text", "text": "hello"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    r = await count(anon_client, key, {"model": MODEL, "messages": [{"role": "user", "content": parts}]})
    assert (r.json()["tokenizer_type"], r.json()["total_tokens"]) == ("openai_tokenizer", 8 + IMAGE_TOKENS)
    assert engine.tokenize_auth == []


async def test_a_failing_replica_falls_back_to_the_openai_rule(
    anon_client: httpx.AsyncClient, key: str, engine: RecordingEngine
) -> None:
    await engine.runner.cleanup()  # the engine is gone; the catalog still lists its replica as READY
    r = await count(anon_client, key, {"model": MODEL, "messages": HELLO})
    assert r.status_code == 200, r.text
    assert (r.json()["tokenizer_type"], r.json()["total_tokens"]) == ("openai_tokenizer", 8)


async def test_a_key_not_bound_to_the_model_is_not_counted_by_its_replica(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, engine: RecordingEngine
) -> None:
    applied = await client.post("/admin/api-key/apply", json={"name": "jack", "month_quota": 1})
    assert applied.status_code == 200, applied.text
    connector_key = applied.json()["data"]["api_key"]
    r = await count(anon_client, connector_key, {"model": MODEL, "messages": HELLO})
    assert (r.json()["tokenizer_type"], r.json()["total_tokens"]) == ("openai_tokenizer", 8)
    assert engine.tokenize_auth == []


async def test_neither_prompt_nor_messages_is_a_400(anon_client: httpx.AsyncClient, key: str) -> None:
    r = await count(anon_client, key, {"model": "gpt-4"})
    assert r.status_code == 400
    assert r.json() == {
        "error": {
            "message": "Either `prompt` or `messages` is required.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "400",
        }
    }


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "gpt-4", "prompt": "x", "messages": HELLO}, "messages"),
        ({"prompt": "x"}, None),
        ({"model": "", "prompt": "x"}, "model"),
        ({"model": "m" * 256, "prompt": "x"}, "model"),
        ({"model": 7, "prompt": "x"}, "model"),
        ({"model": "gpt-4", "prompt": 7}, "prompt"),
        ({"model": "gpt-4", "prompt": []}, "prompt"),
        ({"model": "gpt-4", "prompt": ["x", 1]}, "prompt[1]"),
        ({"model": "gpt-4", "messages": []}, "messages"),
        ({"model": "gpt-4", "messages": "hello"}, "messages"),
        ({"model": "gpt-4", "messages": [{"content": "hello"}]}, "messages[0]"),
        ({"model": "gpt-4", "messages": [{"role": "user"}]}, "messages[0]"),
        ({"model": "gpt-4", "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "x", "name": 3}]}, "messages[0].name"),
        ({"model": "gpt-4", "messages": [{"role": "user", "content": [{"text": "x"}]}]}, "messages[0].content[0]"),
        ({"model": "gpt-4", "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0]"),
        ({"model": "gpt-4", "messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0]"),
        ({"model": "gpt-4", "messages": ["hello"]}, "messages[0]"),
        ([], None),
        ("hello", None),
        (None, None),
    ],
)
async def test_bad_bodies_are_400s_in_the_envelope(
    anon_client: httpx.AsyncClient, key: str, body: Any, param: str | None
) -> None:
    r = await count(anon_client, key, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "400", param)
    assert error["message"]


@pytest.mark.parametrize("raw", [b"", b"not json", b"{", b'{"model": "gpt-4", "prompt": "\\ud800"}', b"\xff\xfe"])
async def test_unparsable_bodies_are_400s(anon_client: httpx.AsyncClient, key: str, raw: bytes) -> None:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    r = await anon_client.post(URL, content=raw, headers=headers)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "400"


async def test_a_body_over_the_limit_is_a_413(anon_client: httpx.AsyncClient, key: str) -> None:
    r = await count(anon_client, key, {"model": "gpt-4", "prompt": "x" * (1024 * 1024)})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "413"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer sk-not-a-key"}, {"x-api-key": ""}])
async def test_no_valid_key_is_a_401_whatever_the_body(anon_client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    for body in ({"model": "gpt-4", "messages": HELLO}, {"model": 3}):
        r = await anon_client.post(URL, json=body, headers=headers)
        assert r.status_code == 401, r.text
        assert r.json() == {
            "error": {"message": "Invalid API key.", "type": "authentication_error", "param": None, "code": "401"}
        }


async def test_the_route_is_in_the_schema_with_its_envelope(anon_client: httpx.AsyncClient) -> None:
    schema = (await anon_client.get("/schema/openapi.json")).json()
    responses = schema["paths"][URL]["post"]["responses"]
    assert {"200", "400", "401", "413"} <= set(responses)
    assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("OpenAIError")


async def test_a_count_takes_one_unit_of_the_rate_limit(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient
) -> None:
    _, key = await issue_key(client, "counted", rpm=3)
    for _ in range(3):
        r = await count(anon_client, key, {"model": "gpt-4", "messages": HELLO})
        assert r.status_code == 200, r.text
    r = await count(anon_client, key, {"model": "gpt-4", "messages": HELLO})
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "429"
