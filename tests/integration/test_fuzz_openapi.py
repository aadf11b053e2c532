"""Schema-driven fuzzing of every operation of the served OpenAPI schema: never a 5xx, always JSON, always the
surface's envelope.

Each operation gets bodies generated from its requestBody's JSON schema (and from a few hand-written valid
bodies), near-valid mutations of them (one field replaced, dropped, retyped, or an unknown one added), random
JSON, and bytes that are not JSON at all; path and query parameters come from their schemas and from odd strings.
The operations are read from `/schema/openapi.json` at run time, so a route added later is fuzzed too.

Leaf values come from `hypothesis_jsonschema.from_schema`; objects are assembled here, because hypothesis-jsonschema
0.23.1's object strategy calls a Hypothesis internal (`cu.many(...).more()`) that Hypothesis 6.170 no longer has
(every object schema fails with `AttributeError: 'many' object has no attribute 'more'`).

Hypothesis runs in a worker thread (each example is synchronous) and sends every request into the test's own event
loop, where the app runs. Derandomized, without shrinking: the same requests on every run, bounded in time; a
failure names the whole request.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.openapi.raw_routes import raw_paths
from orchestrator.platform.settings import Settings
from tests.support.fuzz import (
    JSON_TYPE,
    NUL,
    BodyKind,
    Call,
    Operation,
    _spots,
    authorizations,
    call_strategy,
    check_answer,
    explore,
    not_json_bodies,
    operations,
    sender,
    undecodable_json,
)
from tests.support.settings import ADMIN_KEY, instance_settings

# -- the app under fuzzing -------------------------------------------------------------------------


@pytest.fixture(name="settings")
def fuzz_settings(tmp_path: Path, database_url: str) -> Settings:
    """The shared settings, with Feishu's open API on a closed local port: a fuzzed event never leaves the host."""
    base = instance_settings(tmp_path / "state", database_url)
    return base.model_copy(update={"feishu_base_url": "http://127.0.0.1:9"})


@dataclass
class Seeded:
    """Rows for the fuzzed calls to meet: their ids are offered as path parameters and in valid bodies."""

    ids: list[Any]
    examples: dict[str, list[Any]]
    auths: list[str | None]


async def seed(client: httpx.AsyncClient) -> Seeded:
    async def ok(method: str, path: str, body: Any) -> Any:
        r = await client.request(method, path, json=body)
        assert r.status_code < 300, (path, r.text)
        return r.json()

    model = await ok("POST", "/api/v1/models", {"name": "fuzz-model"})
    await ok("POST", f"/api/v1/models/{model['id']}/replicas", {"endpoint": "http://127.0.0.1:9/v1", "rate_limit": 5})
    client_key = (await ok("POST", "/api/v1/generate_api_key", {"user_id": "fuzz"}))["api_key"]
    group = (await ok("POST", "/admin/group/save", {"name": "fuzz-group"}))["data"]
    key = (await ok("POST", "/admin/api-key/apply", {"name": "fuzz", "group_id": group["id"], "balance": "5"}))["data"]
    await ok("POST", "/admin/api-key/bind-or-unbind-model", {"key_id": key["id"], "model_id": model["id"]})
    await ok("POST", "/admin/api-key/recharge", {"id": key["id"], "balance": "1"})
    bot_config = {"appId": "cli_fuzz", "appSecret": "s", "apiKey": key["api_key"]}
    bot = await ok("POST", "/admin/bot/feishu/save", {"name": "fuzz-bot", "provider": "feishu", "config": bot_config})
    endpoint = {
        "name": "Fuzz Endpoint",
        "connector_type": "openai-gpt4",
        "uri": "http://127.0.0.1:9/v1",
        "token": "t",
        "max_calls_per_second": 0,
        "max_concurrency": 0,
    }
    await ok("POST", "/v1/llm_endpoints", endpoint)
    vm = {
        "name": "fuzz-vm",
        "environment_name": "e",
        "image_name": "i",
        "flavor_name": "f",
        "key_name": "k",
        "port": 8000,
        "run_command": "vllm serve m",
        "security_rules": [{"remote_ip_prefix": "203.0.113.7/32", "port_range_min": 9400, "port_range_max": 9400}],
    }
    examples: dict[str, list[Any]] = {
        "GenerateApiKeyIn": [{"user_id": "u", "allowed_rpm": 60, "name": "n", "allowed_ips": ["10.0.0.0/8"]}],
        "DeleteApiKeyIn": [{"user_id": "fuzz", "api_key_id": 1}],
        "ModelIn": [{"name": "m2"}],
        "ReplicaIn": [
            {"endpoint": "https://127.0.0.1:9/v1/chat/completions", "rate_limit": 2, "engine_api_key": "e"},
            {"create_vm": True, "vm_creation_details": vm},
        ],
        "ReplicaUpdateIn": [{"rate_limit": 3}],
        "ApplyKeyIn": [{"name": "k2", "role": "admin", "month_quota": "1.5", "allowed_ips": ["127.0.0.1"]}],
        "UpdateKeyIn": [{"id": key["id"], "name": "k3", "month_quota": "2", "group_id": 0}],
        "KeyRefIn": [{"id": key["id"]}, {"api_key": key["api_key"]}],
        "RechargeIn": [{"id": key["id"], "balance": "0.5"}],
        "IdIn": [{"id": 1}],
        "ModelSaveIn": [
            {"name": "m3", "provider": "vllm", "price_in": "0.15", "price_out": "0.6", "config": "{}"},
            {"id": model["id"], "multiple": True, "config": {"a": 1}},
        ],
        "GroupSaveIn": [{"name": "g2"}, {"id": group["id"], "key": "k"}],
        "KeyBindIn": [{"key_id": key["id"], "model_id": model["id"]}],
        "GroupBindIn": [{"group_id": group["id"], "model_id": model["id"]}],
        "BotSaveIn": [{"id": bot["data"]["id"], "config": {"appSecret": "********", "modelId": "fuzz-model"}}],
        "EndpointIn": [{**endpoint, "name": "Other Endpoint", "params": {"temperature": 0}}],
        "TokenCounterIn": [
            {"model": "fuzz-model", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
            {"model": "gpt-4", "prompt": ["a", "b"]},
        ],
    }
    return Seeded(
        ids=[1, 2, "fuzz-model", "fuzz-bot", "fuzz-endpoint", "api_key"],
        examples=examples,
        auths=authorizations(client_key, key["api_key"]),
    )


async def _schema(client: httpx.AsyncClient) -> list[Operation]:
    """The operations of the Litestar routes; the raw routes' (the gateway's, LlmEndpoint's completions) proxy to a
    replica, and test_fuzz_gateway.py fuzzes them with a real engine behind."""
    r = await client.get("/schema/openapi.json")
    assert r.status_code == 200
    raw = raw_paths()
    ops = [op for op in operations(r.json()) if op.path not in raw]
    assert len(ops) >= 40, [str(o) for o in ops]  # the toolkit's, the connector's, Moonshot's, LiteLLM's
    return ops


# -- the tests -------------------------------------------------------------------------------------


ADMIN_JSON = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": JSON_TYPE}
# Calls per operation: a body route gets each kind of body; the others vary their parameters and keys.
BODY_EXAMPLES: dict[BodyKind, int] = {"valid": 20, "near-valid": 25, "junk": 15}
OTHER_EXAMPLES = 20


async def test_every_operation_survives_schema_driven_input(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient
) -> None:
    ops = await _schema(client)
    seeded = await seed(client)
    send = sender(anon_client, asyncio.get_running_loop())

    def fuzz() -> None:
        for op in ops:
            examples = seeded.examples.get(op.body_ref or "", [])

            def check(call: Call, op: Operation = op) -> None:
                check_answer(op, call, send(call))

            for body in examples:  # each valid body as written, then Hypothesis's
                check(Call(op.method, op.concrete_path(), content=json.dumps(body).encode(), headers=ADMIN_JSON))
            mix: dict[BodyKind, int] = BODY_EXAMPLES if op.takes_body else {"valid": OTHER_EXAMPLES}
            for kind, n in mix.items():
                explore(call_strategy(op, seeded.ids, examples, seeded.auths, kind), check, n)

    await asyncio.to_thread(fuzz)


async def test_every_body_route_refuses_what_is_not_json(client: httpx.AsyncClient) -> None:
    """Every POST and PUT with bytes that are not UTF-8 JSON, or under another content type: a 4xx (or the
    route's own answer to it) in the route's envelope, never a 500."""
    ops = [op for op in await _schema(client) if op.takes_body]
    seeded = await seed(client)
    for op in ops:
        path = op.concrete_path()
        name = next(iter(sorted((op.body_schema or {}).get("properties", {}))), "name")
        valid = seeded.examples.get(op.body_ref or "", [None])[0]
        for content, content_type in not_json_bodies(name) + undecodable_json(name, valid):
            call = Call(op.method, path, content=content, headers={"Content-Type": content_type})
            r = await client.request(call.method, call.path, content=call.content, headers=call.headers)
            check_answer(op, call, r)
            assert r.status_code < 500, (call, r.text)


def with_nul(op: Operation, examples: list[Any]) -> Iterator[Call]:
    """Calls of `op` with a NUL in one string at a time: each text parameter, each string of each example body."""
    text = f"a{NUL}b"
    body = json.dumps(examples[0]).encode() if examples else None
    for p in op.params:
        if "string" in json.dumps(p.get("schema", {})):
            path = op.concrete_path(**{p["name"]: text}) if p.get("in") == "path" else op.concrete_path()
            params = {p["name"]: text} if p.get("in") == "query" else {}
            yield Call(op.method, path, params=params, content=body, headers=ADMIN_JSON)
    for example in examples:
        for at in _spots(example):
            doc = copy.deepcopy(example)
            parent = doc
            for step in at[:-1]:
                parent = parent[step]
            if at and isinstance(parent[at[-1]], str):
                parent[at[-1]] = text
                yield Call(op.method, op.concrete_path(), content=json.dumps(doc).encode(), headers=ADMIN_JSON)


async def test_nul_in_any_string_is_refused(client: httpx.AsyncClient) -> None:
    """PostgreSQL's text cannot hold NUL: every route refuses it (or never stores it), on both databases."""
    ops = await _schema(client)
    seeded = await seed(client)
    sent = 0
    for op in ops:
        for call in with_nul(op, seeded.examples.get(op.body_ref or "", [])):
            r = await client.request(
                call.method, call.path, params=call.params, content=call.content, headers=call.headers
            )
            check_answer(op, call, r)
            sent += 1
    assert sent > 50


async def test_every_listed_table_can_be_browsed(client: httpx.AsyncClient) -> None:
    names = (await client.get("/api/v1/tables")).json()["tables"]
    for name in names:
        r = await client.get(f"/api/v1/tables/{name}")
        assert r.status_code == 200, (name, r.text)
    rates = (await client.get("/api/v1/tables/credit_rate")).json()["data"]
    assert len(rates) == 18  # LlmEndpoint's seeded rates: a table whose key is not `id`
