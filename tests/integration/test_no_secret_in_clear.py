"""No secret the app holds comes back in clear from any route, and none is stored in clear.

One of every secret is made: a toolkit key, connector keys (one of them reset), a replica's engine key, a
deployment template's engine secret (`secret_env`, its replica made), a Moonshot endpoint's token, a Feishu bot's
app secret and encrypt key, a host's SSH key, and the server's admin and secret keys. Then every GET
operation of the OpenAPI schema is called (path parameters filled with every id made, list filters with known
values, as the admin and as client keys), with the table browser on every table, the connector's POST routes that
answer with a key or a bot, and the gateway's calls and model lists. A key's plain text may appear in one response
only, the one that made it; the other secrets in none. Then every column of every table is read back.
"""

from __future__ import annotations

import itertools
import json
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from orchestrator.platform.secrets import SecretBox, hash_api_key
from orchestrator.platform.settings import Settings
from orchestrator.runtime.container import Deps
from provisioning.ssh_keys import generate_keypair
from tests.support.engines import Engine, engine_in_process
from tests.support.gateway import make_ready
from tests.support.settings import instance_settings
from tests.support.toolkit import vm_details

MODEL = "llama3.1"  # rated by LlmEndpoint, so /api/v1/completions serves it too


@dataclass(frozen=True)
class Secret:
    name: str
    value: str
    made_by: str | None = None
    """The one request whose answer shows it (a key, shown once when made); None: no answer may."""
    hashed: bool = False
    """A client key: its keyed hash is stored (until it is reset)."""


@dataclass
class Recorder:
    """Every answer the app gave in the test: `METHOD /path?query` -> status line, headers and body."""

    answers: list[tuple[str, str]] = field(default_factory=list)

    async def __call__(self, response: httpx.Response) -> None:
        await response.aread()
        request = response.request
        where = f"{request.method} {request.url.raw_path.decode()}"
        self.answers.append((where, f"{response.status_code} {dict(response.headers)} {response.text}"))

    def showing(self, secret: str) -> list[str]:
        return [where for where, text in self.answers if secret in text]


@pytest.fixture(name="settings")
def closed_feishu_settings(tmp_path: Path, database_url: str) -> Settings:
    """Feishu's open API on a closed local port: nothing here reaches the internet."""
    base = instance_settings(tmp_path / "state", database_url)
    return base.model_copy(update={"feishu_base_url": "http://127.0.0.1:9"})


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    async with engine_in_process(MODEL, api_key=ENGINE_KEY, max_tokens=4) as e:
        yield e


def _secret(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


ENGINE_KEY = _secret("engine-key")


@dataclass
class World:
    """What the test made: the secrets, the clients that call with each key, what to fill paths with."""

    secrets: list[Secret]
    clients: dict[str, httpx.AsyncClient]
    int_ids: set[int]
    names: set[str]


def _client(transport: httpx.ASGITransport, recorder: Recorder, key: str) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {key}"}
    hooks: dict[str, list[Callable[..., Any]]] = {"response": [recorder]}
    return httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=headers, event_hooks=hooks)


async def _ok(client: httpx.AsyncClient, method: str, path: str, body: Any = None, **kw: Any) -> Any:
    r = await client.request(method, path, json=body, **kw)
    assert r.status_code < 300, (method, path, r.status_code, r.text)
    return r.json() if r.headers.get("content-type", "").startswith("application/json") else None


@pytest.fixture
async def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def world(transport: httpx.ASGITransport, deps: Deps, engine: Engine, recorder: Recorder) -> AsyncIterator[World]:
    admin = _client(transport, recorder, deps.keys.admin_api_key)
    made = [Secret("admin key", deps.keys.admin_api_key), Secret("secret key", deps.keys.secret_key)]

    [replica_id] = await make_ready(admin, deps, MODEL, engine.chat_url, engine_api_key=ENGINE_KEY)
    made.append(Secret("engine key", ENGINE_KEY))
    model_id = (await _ok(admin, "GET", f"/api/v1/models/{MODEL}"))["id"]
    await _ok(admin, "POST", "/admin/model/save", {"id": model_id, "price_in": "0.15", "price_out": "0.6"})
    group = (await _ok(admin, "POST", "/admin/group/save", {"name": "team"}))["data"]

    toolkit = await _ok(admin, "POST", "/api/v1/generate_api_key", {"user_id": "alice", "name": "laptop"})
    made.append(Secret("toolkit key", toolkit["api_key"], "POST /api/v1/generate_api_key", hashed=True))
    keys = {}
    for name, role in (("jack", "user"), ("ops", "admin"), ("rotated", "user")):
        body = {"name": name, "role": role, "group_id": group["id"], "balance": "100", "month_quota": "1"}
        keys[name] = (await _ok(admin, "POST", "/admin/api-key/apply", body))["data"]
        made.append(Secret(f"{name}'s key", keys[name]["api_key"], "POST /admin/api-key/apply", name != "rotated"))
        await _ok(
            admin, "POST", "/admin/api-key/bind-or-unbind-model", {"key_id": keys[name]["id"], "model_id": model_id}
        )
    reset = (await _ok(admin, "POST", "/admin/api-key/reset-key", {"id": keys["rotated"]["id"]}))["data"]
    made.append(Secret("rotated's new key", reset["api_key"], "POST /admin/api-key/reset-key", hashed=True))

    token = _secret("moonshot-token")
    endpoint = {"name": "Moon Shot", "connector_type": "openai-gpt4", "uri": "http://127.0.0.1:9/v1", "token": token}
    await _ok(admin, "POST", "/v1/llm_endpoints", {**endpoint, "max_calls_per_second": 0, "max_concurrency": 0})
    made.append(Secret("llm_endpoint token", token))

    app_secret, encrypt_key = _secret("feishu-app-secret"), _secret("feishu-encrypt-key")
    config = {"appId": "cli_1", "appSecret": app_secret, "encryptKey": encrypt_key, "apiKey": keys["jack"]["api_key"]}
    bot = await _ok(admin, "POST", "/admin/bot/feishu/save", {"name": "helper", "provider": "feishu", "config": config})
    made += [Secret("feishu app secret", app_secret), Secret("feishu encrypt key", encrypt_key)]

    (host_private, _), (_, host_public) = generate_keypair("admin@laptop"), generate_keypair("root@gpu-1")
    host = {"name": "gpu-1", "pool": "rack-a", "address": "192.0.2.10", "ssh_user": "ubuntu", "gpus": 2}
    await _ok(admin, "POST", "/api/v1/hosts", {**host, "ssh_private_key": host_private, "host_key": host_public})
    made.append(Secret("host's SSH key", host_private.splitlines()[1]))  # a PEM line: no JSON escape in it

    hf_token = _secret("hf-token")
    engine = {"model": "meta-llama/Llama-3.1-8B-Instruct", "secret_env": {"HF_TOKEN": hf_token}}
    template = {"create_vm": True, "vm_creation_details": vm_details(run_command=None, engine=engine)}
    await _ok(admin, "PUT", f"/api/v1/models/{model_id}/deployment", {"template": template, "replicas": 1})
    made.append(Secret("deployment's engine secret", hf_token))
    assert await deps.keeper.keep() is True  # its replica made, the secret sealed in it too
    [member] = (await _ok(admin, "GET", f"/api/v1/models/{model_id}/deployment"))["members"]

    clients = {
        "admin": admin,
        "toolkit key": _client(transport, recorder, toolkit["api_key"]),
        "connector key": _client(transport, recorder, keys["jack"]["api_key"]),
        "connector admin key": _client(transport, recorder, keys["ops"]["api_key"]),
        "reset-away key": _client(transport, recorder, keys["rotated"]["api_key"]),  # refused since the reset
    }
    task_id = await _chat_through_the_gateway(clients, deps)
    world = World(
        secrets=made,
        clients=clients,
        int_ids={
            replica_id,
            member["id"],
            model_id,
            group["id"],
            toolkit["id"],
            bot["data"]["id"],
            *(k["id"] for k in keys.values()),
        },
        names={MODEL, "helper", "moon-shot", "jack", "ops", task_id},
    )
    try:
        yield world
    finally:
        for client in clients.values():
            await client.aclose()


async def _chat_through_the_gateway(clients: dict[str, httpx.AsyncClient], deps: Deps) -> str:
    """Calls of every kind of key, so that usage rows, sessions and threads exist (and are written); the id of a
    queued completion."""
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4}
    for who in ("admin", "toolkit key", "connector key", "connector admin key"):
        client = clients[who]
        session = {"Session-Id": f"chat-{who.replace(' ', '-')}"}
        await _ok(client, "POST", "/v1/chat/completions", chat, headers=session)
        await _ok(client, "POST", "/v1/chat/completions", {**chat, "stream": True}, headers=session)
        await _ok(client, "POST", "/api/v1/chat/completions", chat)
    credits = {**chat, "temperature": 0.5}
    await _ok(clients["connector key"], "POST", "/api/v1/completions", credits)
    queued = await _ok(clients["connector key"], "POST", "/api/v1/qcompletions", credits)
    r = await clients["reset-away key"].post("/v1/chat/completions", json=chat)
    assert r.status_code == 401, r.text
    await deps.records.flush()
    return str(queued["task_id"])


# -- reading everything back -----------------------------------------------------------------------


def _filled(path: str, params: list[dict[str, Any]], world: World) -> Iterator[str]:
    """`path` with its parameters filled in every way the world's ids allow."""
    slots = [p for p in params if p.get("in") == "path"]
    choices = []
    for p in slots:
        integer = p.get("schema", {}).get("type") == "integer"
        choices.append(sorted(world.int_ids | {1, 2, 3}) if integer else sorted(world.names))
    for values in itertools.product(*choices):
        filled = path
        for p, value in zip(slots, values, strict=True):
            filled = filled.replace("{" + p["name"] + "}", str(value))
        yield filled


def _queries(params: list[dict[str, Any]], world: World) -> Iterator[dict[str, str]]:
    """No query; then each filter alone with values that match rows; then the longest page."""
    yield {}
    for p in params:
        if p.get("in") != "query":
            continue
        if p["name"] == "limit":
            yield {"limit": "1000"}
        elif "integer" in json.dumps(p.get("schema", {})):
            yield from ({p["name"]: str(i)} for i in sorted(world.int_ids))
        else:
            yield from ({p["name"]: name} for name in ("", "a", "jack", "user", "admin"))


async def _read_everything(world: World) -> None:
    admin = world.clients["admin"]
    for table in (await admin.get("/api/v1/tables")).json()["tables"]:
        r = await admin.get(f"/api/v1/tables/{table}")
        if r.status_code == 200:  # every row's id fills the paths below (sessions, threads, payments, ...)
            world.int_ids |= {row["id"] for row in r.json()["data"] if isinstance(row.get("id"), int)}
    schema = (await admin.get("/schema/openapi.json")).json()
    gets = [(path, item["get"].get("parameters", [])) for path, item in schema["paths"].items() if "get" in item]
    assert len(gets) >= 30
    for path, params in gets:
        for filled in _filled(path, params, world):
            for query in _queries(params, world):
                for client in world.clients.values():
                    await client.get(filled, params=query)
    for path in ("/v1/models", "/models", "/health", "/metrics"):
        for client in world.clients.values():
            await client.get(path)
    # The connector's POST routes that answer with a key or a bot (its lists and details are all GETs).
    jack = world.clients["connector key"]
    mine = (await jack.get("/user/api-key/mine")).json()["data"]
    await _ok(admin, "POST", "/admin/api-key/update", {"id": mine["id"], "email": "jack@example.com"})
    await _ok(admin, "POST", "/admin/api-key/recharge", {"id": mine["id"], "balance": "1"})
    bot = (await admin.get("/admin/bot/feishu/list")).json()["data"]["items"][0]
    for prefix in ("/admin/bot/feishu", "/admin/bot-connector"):
        # The masked config sent back as it was shown keeps every secret.
        await _ok(admin, "POST", f"{prefix}/save", {"id": bot["id"], "config": bot["config"]})


async def test_no_secret_comes_back_in_clear(world: World, recorder: Recorder) -> None:
    await _read_everything(world)
    assert len(recorder.answers) > 1000  # every GET, as every caller
    for secret in world.secrets:
        expected = [secret.made_by] if secret.made_by else []
        assert recorder.showing(secret.value) == expected, secret.name


async def test_no_secret_is_stored_in_clear(world: World, deps: Deps) -> None:
    async with deps.engine.connect() as conn:
        tables = await conn.run_sync(lambda sync: sa.inspect(sync).get_table_names())
        rows = {t: (await conn.execute(sa.text(f'SELECT * FROM "{t}"'))).mappings().all() for t in tables}
    assert {"api_key", "replicas", "llm_endpoint", "bot_connector", "metric"} <= set(rows)
    cells = [(t, column, _text(value)) for t, found in rows.items() for row in found for column, value in row.items()]
    for secret in world.secrets:
        assert [(t, c) for t, c, text in cells if secret.value in text] == [], secret.name

    # ...and they are there, hashed or sealed, not lost.
    box = SecretBox(deps.keys.secret_key)
    hashes = {row["key_hash"] for row in rows["api_key"]}
    for secret in world.secrets:
        assert (hash_api_key(deps.keys.secret_key, secret.value) in hashes) is secret.hashed, secret.name
    assert [box.open(r["engine_key_sealed"]) for r in rows["replicas"] if r["engine_key_sealed"]] == [ENGINE_KEY]
    [deployment] = rows["deployments"]
    [hf_token] = [s.value for s in world.secrets if s.name == "deployment's engine secret"]
    assert json.loads(box.open(deployment["template_secrets_sealed"])) == {"HF_TOKEN": hf_token}
    sealed_in_replicas = [box.open(r["engine_secrets_sealed"]) for r in rows["replicas"] if r["engine_secrets_sealed"]]
    assert [json.loads(s) for s in sealed_in_replicas] == [{"HF_TOKEN": hf_token}]
    [endpoint] = rows["llm_endpoint"]
    assert box.open(endpoint["token_sealed"]) in {s.value for s in world.secrets if s.name == "llm_endpoint token"}
    [bot] = rows["bot_connector"]
    sealed = json.loads(box.open(bot["secrets_sealed"]))
    assert set(sealed) == {"appSecret", "encryptKey", "apiKey"}


def _text(value: object) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    return str(value)
