"""Fuzzing the gateway's raw ASGI routes (they are not in the OpenAPI schema): bodies from JSON schemas of their
known shapes, near-valid mutations, random JSON and bytes, with real client keys past authentication and a real
engine simulator behind a READY replica. Never an unexplained 5xx, always JSON (or the stream's own format),
always the route's envelope. The machinery is test_fuzz_openapi's (tests/support/fuzz.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import strategies as st

from orchestrator.runtime.container import Deps
from tests.support.engines import Engine, engine_in_process
from tests.support.fuzz import (
    JSON_TYPE,
    ODD_TEXT,
    BodyKind,
    Call,
    body_strategy,
    explore,
    is_llmendpoint_error,
    is_openai_error,
    is_toolkit_error,
    not_json_bodies,
    sender,
    undecodable_json,
)
from tests.support.gateway import make_ready

MODEL = "llama3.1"  # one of LlmEndpoint's rated models, so /api/v1/completions can price its calls
COLD = "cold-model"  # registered, no replica
ENGINE_KEY = "engine-only-secret"

# -- the routes' shapes, as JSON schemas -----------------------------------------------------------

_MODEL = {"enum": [MODEL, COLD]}  # other names come from the near-valid mutations and the path
_TOKENS = {"type": "integer", "minimum": 1, "maximum": 8}
_STREAM_OPTIONS = {"type": "object", "properties": {"include_usage": {"type": "boolean"}}}
_STOP = {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "array", "items": {"type": "string"}, "maxItems": 2}]}


def _messages(roles: list[str]) -> dict[str, Any]:
    message = {
        "type": "object",
        "properties": {"role": {"enum": roles}, "content": {"type": "string", "maxLength": 40}},
        "required": ["role", "content"],
    }
    return {"type": "array", "items": message, "minItems": 1, "maxItems": 3}


_SAMPLING = {
    "model": _MODEL,
    "max_tokens": _TOKENS,
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "stream": {"type": "boolean"},
    "stream_options": _STREAM_OPTIONS,
    "n": {"type": "integer", "minimum": 1, "maximum": 2},
    "stop": _STOP,
}


def _chat(roles: list[str], **extra: Any) -> dict[str, Any]:
    properties = {**_SAMPLING, "messages": _messages(roles), "logprobs": {"type": "boolean"}, **extra}
    return {"type": "object", "properties": properties, "required": ["model", "messages"]}


CHAT = _chat(["system", "user", "assistant", "tool", "developer"])
TOOLKIT_CHAT = _chat(["system", "user", "assistant"])
QUEUED_CHAT = _chat(
    ["system", "user", "assistant"],
    priority={"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1},
    timeout={"type": "number", "exclusiveMinimum": 0, "maximum": 30},
)
_PROMPT = {
    "anyOf": [{"type": "string", "maxLength": 40}, {"type": "array", "items": {"type": "string"}, "maxItems": 2}]
}
COMPLETION = {"type": "object", "properties": {**_SAMPLING, "prompt": _PROMPT}, "required": ["model", "prompt"]}
LLMENDPOINT = {
    "type": "object",
    "properties": {
        "messages": _messages(["user", "assistant", "system"]),
        "model": _MODEL,
        "max_tokens": _TOKENS,
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "num_context": {"type": "integer", "minimum": 1, "maximum": 4096},
        "stream": {"type": "boolean"},
        "output_format": {"enum": ["default", "json"]},
    },
    "required": ["messages", "model", "max_tokens", "temperature"],
}
_HELLO = [{"role": "user", "content": "Hello!"}]


@dataclass(frozen=True)
class Route:
    path: str
    """`{model}` is filled in from the models and odd strings."""
    schema: dict[str, Any]
    surface: str
    """openai (LiteLLM's envelope), toolkit, or llmendpoint."""
    example: dict[str, Any]


def _chat_example(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": _HELLO, "max_tokens": 4, **extra}


ROUTES = [
    Route("/v1/chat/completions", CHAT, "openai", _chat_example()),
    Route("/chat/completions", CHAT, "openai", _chat_example(stream=True)),
    Route("/engines/{model}/chat/completions", CHAT, "openai", _chat_example()),
    Route("/openai/deployments/{model}/chat/completions", CHAT, "openai", _chat_example(n=2)),
    Route("/v1/completions", COMPLETION, "openai", {"model": MODEL, "prompt": "Hi", "max_tokens": 4}),
    Route("/completions", COMPLETION, "openai", {"model": MODEL, "prompt": ["a", "b"], "stream": True}),
    Route("/openai/deployments/{model}/completions", COMPLETION, "openai", {"model": MODEL, "prompt": "Hi"}),
    Route("/api/v1/chat/completions", TOOLKIT_CHAT, "toolkit", _chat_example(stream=True)),
    Route("/queue/chat/completions", QUEUED_CHAT, "openai", _chat_example(priority=-3, timeout=5)),
    Route(
        "/api/v1/completions",
        LLMENDPOINT,
        "llmendpoint",
        {"model": MODEL, "messages": _HELLO, "max_tokens": 4, "temperature": 0.5, "output_format": "json"},
    ),
]

# -- answers ---------------------------------------------------------------------------------------

# The gateway's own 5xx, documented: 503 (with Retry-After) when the model has no READY replica, 502 when every
# replica tried refused the connection. Only LiteLLM's surface answers them: the toolkit's chat says so with a 400
# ("No Replica available / ready."), LlmEndpoint's with its 400 "Max attempts reached - no available hosts".
DOCUMENTED_5XX = {503: "service_unavailable", 502: "upstream_unreachable"}


def _is_gateway_5xx(route: Route, r: httpx.Response) -> bool:
    if route.surface != "openai" or r.status_code not in DOCUMENTED_5XX or "retry-after" not in r.headers:
        return False
    body = r.json()
    return is_openai_error(body) and body["error"]["type"] == DOCUMENTED_5XX[r.status_code]


def _check_stream(r: httpx.Response) -> None:
    media = r.headers.get("content-type", "")
    lines = [line for line in r.text.splitlines() if line]
    if media.startswith("text/event-stream"):  # the engine's own SSE, passed through
        for line in lines:
            assert line.startswith("data: "), line
            if line != "data: [DONE]":
                json.loads(line.removeprefix("data: "))
    else:  # LlmEndpoint's NDJSON
        assert media.startswith("application/x-ndjson"), media
        for line in lines:
            assert set(json.loads(line)) == {"role", "content"}, line


def check_answer(route: Route, call: Call, r: httpx.Response) -> None:
    where = f"{call} -> {r.status_code} {r.headers.get('content-type')} {r.text[:500]}"
    try:
        assert r.status_code < 500 or _is_gateway_5xx(route, r)
        if r.status_code == 200 and not r.headers.get("content-type", "").startswith(JSON_TYPE):
            _check_stream(r)
            return
        assert r.headers.get("content-type", "").startswith(JSON_TYPE)
        body = r.json()
        if r.status_code < 400:
            assert isinstance(body, dict)
        elif route.surface == "llmendpoint":  # it words the engine's refusals its own way
            assert is_llmendpoint_error(body)
        elif route.surface == "toolkit":  # its shapes, or the engine's own refusal passed through as it came
            assert is_toolkit_error(body) or set(body) == {"error", "message", "allowed_rpm"} or _engine_refusal(body)
        else:  # LiteLLM's envelope, or the engine's own refusal passed through as it came
            assert is_openai_error(body) or _engine_refusal(body)
    except (AssertionError, ValueError) as e:
        raise AssertionError(f"{where}: {e!r}") from e


def _engine_refusal(body: Any) -> bool:
    """vLLM's (and the simulator's) error body: `{"error": {"message", "type", "param", "code": 400}}`, or the older
    `{"object": "error", "message", "type", "code"}`."""
    if not isinstance(body, dict):
        return False
    error = body.get("error")
    if isinstance(error, dict):
        return isinstance(error.get("message"), str) and isinstance(error.get("code"), int)
    return body.get("object") == "error" and isinstance(body.get("message"), str)


# -- the app under fuzzing -------------------------------------------------------------------------


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    async with engine_in_process(MODEL, api_key=ENGINE_KEY, max_tokens=8) as e:
        yield e


@dataclass(frozen=True)
class Keys:
    toolkit: str
    """An sk- key: every model, never refused for spend."""
    connector: str
    """A br- key, bound to MODEL, with a balance (LlmEndpoint's credits come off it)."""


@pytest.fixture
async def keys(client: httpx.AsyncClient, deps: Deps, engine: Engine) -> Keys:
    await make_ready(client, deps, MODEL, engine.chat_url, engine_api_key=ENGINE_KEY, rate_limit=10**6)
    assert (await client.post("/api/v1/models", json={"name": COLD})).status_code == 201
    model_id = (await client.get(f"/api/v1/models/{MODEL}")).json()["id"]
    r = await client.post("/admin/model/save", json={"id": model_id, "price_in": "0.15", "price_out": "0.6"})
    assert r.status_code == 200, r.text
    toolkit = await client.post("/api/v1/generate_api_key", json={"user_id": "fuzz", "allowed_rpm": 1_000_000})
    applied = await client.post(
        "/admin/api-key/apply", json={"name": "fuzz", "balance": "100000", "allowed_rpm": 10**9}
    )
    connector = applied.json()["data"]
    r = await client.post("/admin/api-key/bind-or-unbind-model", json={"key_id": connector["id"], "model_id": model_id})
    assert r.json() == {"success": True, "data": "created"}, r.text
    return Keys(toolkit.json()["api_key"], connector["api_key"])


def key_headers(keys: Keys) -> st.SearchStrategy[dict[str, str]]:
    """Every way a key is sent (LlmEndpoint's raw `Authorization: <key>` too), mostly real keys, sometimes with
    a Session-Id; sometimes no key or a wrong one."""
    sent = st.sampled_from([keys.connector, keys.toolkit, keys.connector, keys.toolkit, "", "sk-not-a-key"])
    styles = st.sampled_from(["bearer", "bearer", "raw", "x-api-key", "api-key"])
    session = st.none() | st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=140)
    return st.builds(_auth_header, sent, styles, session)


def _auth_header(key: str, style: str, session: str | None) -> dict[str, str]:
    headers = {} if session is None else {"Session-Id": session}
    if not key:
        return headers
    if style == "bearer":
        return headers | {"Authorization": f"Bearer {key}"}
    if style == "raw":
        return headers | {"Authorization": key}
    return headers | {style: key}


def call_strategy(route: Route, keys: Keys, kind: BodyKind) -> st.SearchStrategy[Call]:
    bodies = body_strategy(route.schema, [route.example], kind, undecodable=True)
    models = st.sampled_from([MODEL, MODEL, COLD]) | ODD_TEXT.filter(bool)

    @st.composite
    def build(draw: st.DrawFn) -> Call:
        path = route.path.replace("{model}", quote(draw(models), safe=""))
        content, content_type = draw(bodies)
        headers = draw(key_headers(keys)) | ({"Content-Type": content_type} if content_type else {})
        return Call("POST", path, content=content, headers=headers)

    return build()


# -- the tests -------------------------------------------------------------------------------------

EXAMPLES: dict[BodyKind, int] = {"valid": 30, "near-valid": 40, "junk": 20}


async def test_every_gateway_route_survives_schema_driven_input(anon_client: httpx.AsyncClient, keys: Keys) -> None:
    send = sender(anon_client, asyncio.get_running_loop())

    def fuzz() -> None:
        for route in ROUTES:

            def check(call: Call, route: Route = route) -> None:
                check_answer(route, call, send(call))

            path = route.path.replace("{model}", MODEL)
            # The valid body as written first: it is served (an sk- key has no credits for LlmEndpoint's calls).
            for key in (keys.connector,) if route.surface == "llmendpoint" else (keys.toolkit, keys.connector):
                r = send(Call("POST", path, content=json.dumps(route.example).encode(), headers=_auth(key)))
                assert r.status_code == 200, (route.path, r.text)
            for kind, n in EXAMPLES.items():
                explore(call_strategy(route, keys, kind), check, n)

    await asyncio.to_thread(fuzz)


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Content-Type": JSON_TYPE}


async def test_every_gateway_route_refuses_what_is_not_json(anon_client: httpx.AsyncClient, keys: Keys) -> None:
    for route in ROUTES:
        path = route.path.replace("{model}", MODEL)
        for content, content_type in not_json_bodies("model"):
            call = Call("POST", path, content=content, headers={**_auth(keys.toolkit), "Content-Type": content_type})
            r = await anon_client.post(call.path, content=call.content, headers=call.headers)
            check_answer(route, call, r)
            assert 400 <= r.status_code < 500, (call, r.text)
        for method in ("GET", "PUT", "DELETE"):
            r = await anon_client.request(method, path, headers=_auth(keys.toolkit))
            assert r.status_code == 405, (method, path, r.text)


async def test_the_model_lists_answer_every_key(anon_client: httpx.AsyncClient, keys: Keys) -> None:
    send = sender(anon_client, asyncio.get_running_loop())

    def lists() -> None:
        def check(call: Call) -> None:
            r = send(call)
            assert r.status_code in {200, 401}, (call, r.text)
            body = r.json()
            assert (body["object"] == "list") if r.status_code == 200 else is_openai_error(body), (call, r.text)

        calls = st.builds(
            lambda path, headers: Call("GET", path, headers=headers),
            st.sampled_from(["/v1/models", "/models"]),
            key_headers(keys),
        )
        explore(calls, check, 20)

    await asyncio.to_thread(lists)


async def test_undecodable_json_is_a_400_on_llmendpoint(anon_client: httpx.AsyncClient, keys: Keys) -> None:
    [route] = [r for r in ROUTES if r.surface == "llmendpoint"]
    await _refuses_undecodable_json(anon_client, keys, [route])


async def test_undecodable_json_is_a_400_on_the_gateway(anon_client: httpx.AsyncClient, keys: Keys) -> None:
    await _refuses_undecodable_json(anon_client, keys, [r for r in ROUTES if r.surface != "llmendpoint"])


async def _refuses_undecodable_json(anon_client: httpx.AsyncClient, keys: Keys, routes: list[Route]) -> None:
    """msgspec raises UnicodeDecodeError for bytes that are not UTF-8 in a string, and RecursionError for nesting
    past its limit: neither is its DecodeError. Each must be a 400, not escape the route."""
    escaped = []
    for route in routes:
        path = route.path.replace("{model}", MODEL)
        for content, content_type in undecodable_json("model", route.example):
            headers = {**_auth(keys.connector), "Content-Type": content_type}
            try:
                r = await anon_client.post(path, content=content, headers=headers)
            except (UnicodeDecodeError, RecursionError) as e:
                escaped.append((route.path, content[-30:], repr(e)))
            else:
                check_answer(route, Call("POST", path, content=content, headers=headers), r)
    assert escaped == []


async def test_a_prompt_with_nul_is_recorded(anon_client: httpx.AsyncClient, keys: Keys, deps: Deps) -> None:
    """A NUL in a message is valid JSON (`\u0000`) and the engine answers it; its record is written too, on
    PostgreSQL as well (whose text cannot hold a NUL), and the records after it."""
    for content in ("a\x00b", "fine"):
        body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2}
        r = await anon_client.post("/v1/chat/completions", json=body, headers=_auth(keys.connector))
        assert r.status_code == 200, r.text
        assert await deps.records.flush() == 1
    assert len(deps.records) == 0
