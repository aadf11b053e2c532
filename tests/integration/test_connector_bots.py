"""Feishu bots end to end: the admin routes with their masked secrets, and the event receiver answering a chat
through the gateway (as the bot's key, on a real engine simulator) and replying on a fake Feishu open API."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import select

from orchestrator.platform.settings import Settings
from orchestrator.runtime.container import Deps
from orchestrator.store.db import make_sessions
from orchestrator.store.tables import BotConnector
from orchestrator.surfaces.feishu.client import signature
from tests.support.engines import Engine, engine_in_process
from tests.support.fake_feishu import FakeFeishu, encrypt_event, fake_feishu
from tests.support.gateway import make_ready
from tests.support.settings import instance_settings

APP_ID, APP_SECRET = "cli_app", "app-secret"
ENCRYPT_KEY = "encrypt-key-0123456789"
MODEL = "bot-model"
MASK = "********"
BOT = "helper"
HOOK = f"/bot/feishu/{BOT}/webhook/event"
NOT_ADMIN = "Unauthorized: you are not an admin role."
FORBIDDEN = "Error: You do not have permission to access the ["
ANSWER_DEADLINE_S = 10.0
UNSIGNED = "the event is not signed (X-Lark-Signature)"


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
async def feishu() -> AsyncIterator[FakeFeishu]:
    async with fake_feishu({APP_ID: APP_SECRET}) as fake:
        yield fake


@pytest.fixture
def settings(tmp_path: Path, database_url: str, feishu: FakeFeishu) -> Settings:
    """The shared settings (tests/conftest.py), with Feishu's open API on the fake."""
    return instance_settings(tmp_path / "state", database_url).model_copy(update={"feishu_base_url": feishu.base_url})


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    async with engine_in_process(MODEL, max_tokens=8) as e:
        yield e


@dataclass(frozen=True)
class BotKey:
    key_id: int
    api_key: str
    model_id: int


@pytest.fixture
async def bot_key(client: httpx.AsyncClient, deps: Deps, engine: Engine) -> AsyncIterator[BotKey]:
    """A connector key bound to MODEL, which has a READY replica on the engine simulator.

    On teardown every answer the receiver still owes is awaited, so no task outlives the test."""
    model_id = await _save_model(client)
    await make_ready(client, deps, MODEL, engine.chat_url)
    key = await _apply_key(client, "bot-key")
    r = await client.post("/admin/api-key/bind-or-unbind-model", json={"key_id": key.key_id, "model_id": model_id})
    assert r.json() == {"success": True, "data": "created"}, r.text
    yield BotKey(key.key_id, key.api_key, model_id)
    await _answers_done()


@dataclass(frozen=True)
class Key:
    key_id: int
    api_key: str


# -- helpers ---------------------------------------------------------------------------------


async def _save_model(client: httpx.AsyncClient) -> int:
    body = {"name": MODEL, "provider": "local", "price_in": 1, "price_out": 2}
    r = await client.post("/admin/model/save", json=body)
    assert r.status_code == 200, r.text
    return int(r.json()["data"]["id"])


async def _apply_key(client: httpx.AsyncClient, name: str) -> Key:
    r = await client.post("/admin/api-key/apply", json={"name": name, "month_quota": 1, "balance": 1})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert data["api_key"].startswith("br-")
    return Key(int(data["id"]), str(data["api_key"]))


def _config(api_key: str, **extra: str) -> dict[str, str]:
    return {"appId": APP_ID, "appSecret": APP_SECRET, "apiKey": api_key, "modelId": MODEL, **extra}


async def _save_bot(client: httpx.AsyncClient, config: dict[str, str] | str, name: str = BOT) -> dict[str, Any]:
    r = await client.post("/admin/bot/feishu/save", json={"name": name, "provider": "feishu", "config": config})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert body["success"] is True
    data: dict[str, Any] = body["data"]
    return data


def _message(event_id: str, message_id: str, text: str = "hello", **message: str) -> dict[str, Any]:
    return {
        "schema": "2.0",
        "header": {"event_id": event_id, "event_type": "im.message.receive_v1", "app_id": APP_ID},
        "event": {
            "sender": {"sender_id": {"open_id": "ou_1"}},
            "message": {
                "message_id": message_id,
                "chat_id": "oc_1",
                "chat_type": "p2p",
                "message_type": "text",
                "content": json.dumps({"text": text}),
                **message,
            },
        },
    }


async def _answers_done() -> None:
    """Wait (with a deadline) for every answer the receiver is still working on in this loop."""
    pending = [
        t
        for t in asyncio.all_tasks()
        if not t.done() and getattr(t.get_coro(), "__qualname__", "") == "FeishuReceiver._answer"
    ]
    if pending:
        async with asyncio.timeout(ANSWER_DEADLINE_S):
            await asyncio.gather(*pending)


async def _engine_completion(engine: Engine, text: str) -> str:
    """What the engine itself answers to `text`: the reply the bot must relay."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
    async with httpx.AsyncClient() as c:
        r = await c.post(engine.chat_url, json=body)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def _signed(raw: bytes, *, at: float | None = None, nonce: str = "nonce-1") -> dict[str, str]:
    """The headers Feishu sends with `raw` for a bot with ENCRYPT_KEY, signed at `at` (default: now)."""
    timestamp = str(int(time.time() if at is None else at))
    return {
        "Content-Type": "application/json",
        "X-Lark-Request-Timestamp": timestamp,
        "X-Lark-Request-Nonce": nonce,
        "X-Lark-Signature": signature(timestamp, nonce, ENCRYPT_KEY, raw),
    }


def _failure(r: httpx.Response, status: int, message: str) -> None:
    assert (r.status_code, r.json()) == (status, {"success": False, "data": message}), r.text


# -- admin routes ----------------------------------------------------------------------------


@pytest.mark.parametrize("as_string", [False, True], ids=["config-object", "config-string"])
async def test_saved_bot_shows_public_fields_and_masks_secrets_everywhere(
    client: httpx.AsyncClient, bot_key: BotKey, as_string: bool
) -> None:
    config = _config(bot_key.api_key, encryptKey=ENCRYPT_KEY)
    saved = await _save_bot(client, json.dumps(config) if as_string else config)
    expected = {"appId": APP_ID, "modelId": MODEL, "appSecret": MASK, "apiKey": MASK, "encryptKey": MASK}
    assert (saved["name"], saved["provider"], saved["config"]) == (BOT, "feishu", expected)
    bot_id = saved["id"]

    detail = await client.get(f"/admin/bot/feishu/detail/{bot_id}")
    assert detail.status_code == 200
    assert detail.json()["data"]["config"] == expected
    listing = await client.get("/admin/bot/feishu/list")
    assert listing.status_code == 200
    assert [(b["id"], b["name"], b["config"]) for b in listing.json()["data"]["items"]] == [(bot_id, BOT, expected)]
    alias = await client.get("/admin/bot-connector/list")
    assert alias.status_code == 200
    assert alias.json()["data"]["items"] == listing.json()["data"]["items"]
    alias_detail = await client.get(f"/admin/bot-connector/detail/{bot_id}")
    assert alias_detail.json() == detail.json()

    table = await client.get("/api/v1/tables/bot_connector")
    assert table.status_code == 200
    [row] = table.json()["data"]
    assert row["name"] == BOT
    assert row["secrets_sealed"] == "<redacted>"
    assert json.loads(row["config"]) == {"appId": APP_ID, "modelId": MODEL}

    for text in (json.dumps(saved), *(r.text for r in (detail, listing, alias, alias_detail, table))):
        for secret in (APP_SECRET, bot_key.api_key, ENCRYPT_KEY):
            assert secret not in text


async def test_secrets_are_not_stored_in_the_clear(client: httpx.AsyncClient, deps: Deps, bot_key: BotKey) -> None:
    await _save_bot(client, _config(bot_key.api_key, encryptKey=ENCRYPT_KEY))
    async with make_sessions(deps.engine)() as s:
        row = (await s.exec(select(BotConnector))).one()
    for secret in (APP_SECRET, bot_key.api_key, ENCRYPT_KEY):
        assert secret not in row.model_dump_json()


async def test_update_with_the_masked_values_keeps_the_secrets(
    client: httpx.AsyncClient, feishu: FakeFeishu, engine: Engine, bot_key: BotKey
) -> None:
    bot_id = (await _save_bot(client, _config(bot_key.api_key)))["id"]
    shown = (await client.get(f"/admin/bot/feishu/detail/{bot_id}")).json()["data"]
    r = await client.post("/admin/bot/feishu/save", json={"id": bot_id, "name": "renamed", "config": shown["config"]})
    assert r.status_code == 200, r.text
    assert r.json()["data"]["name"] == "renamed"
    assert r.json()["data"]["config"] == shown["config"]

    # No token was fetched before the update: this reply's token fetch proves the app secret kept.
    assert feishu.token_requests == 0
    r = await client.post("/bot/feishu/renamed/webhook/event", json=_message("ev1", "om_1"))
    assert (r.status_code, r.json()) == (200, {})
    [reply] = await feishu.wait_for_replies(1)
    assert (reply.message_id, reply.text) == ("om_1", await _engine_completion(engine, "hello"))
    assert feishu.token_requests == 1


async def test_update_replaces_a_secret_given_anew(
    client: httpx.AsyncClient, feishu: FakeFeishu, bot_key: BotKey
) -> None:
    bot_id = (await _save_bot(client, _config(bot_key.api_key)))["id"]
    r = await client.post("/admin/bot/feishu/save", json={"id": bot_id, "config": {"appSecret": "wrong-secret"}})
    assert r.status_code == 200, r.text
    assert r.json()["data"]["config"]["appSecret"] == MASK
    assert r.json()["data"]["name"] == BOT
    r = await client.post(HOOK, json=_message("ev1", "om_1"))
    assert (r.status_code, r.json()) == (200, {})
    await _answers_done()
    assert feishu.token_requests == 1  # refused: the new (wrong) secret was the one sent
    assert feishu.replies == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"provider": "feishu"}, "name is required"),
        ({"name": "", "provider": "feishu"}, "name: String should have at least 1 character"),
        ({"name": "b"}, "provider is required"),
        ({"name": "b", "provider": "slack"}, "provider must be feishu"),
        ({"name": "b", "provider": "feishu", "config": None}, "config is required"),
        ({"name": "b", "provider": "feishu", "config": "{not json"}, None),
        ({"name": "b", "provider": "feishu", "config": "[1]"}, "config must be a JSON object"),
    ],
)
async def test_save_refuses_a_bad_body(
    client: httpx.AsyncClient, bot_key: BotKey, body: dict[str, Any], message: str | None
) -> None:
    body = {"config": _config(bot_key.api_key), **body}
    r = await client.post("/admin/bot/feishu/save", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["success"] is False
    if message is None:
        assert r.json()["data"].startswith("config is not valid JSON")
    else:
        assert r.json()["data"] == message
    assert (await client.get("/admin/bot/feishu/list")).json()["data"]["items"] == []


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"apiKey": "br-not-a-key"}, "config.apiKey is not a valid API key"),
        ({"apiKey": MASK}, "config.apiKey is required"),  # a new bot has no secret to keep
        ({"appSecret": ""}, "config.appSecret is required"),
        ({"appId": None}, "config.appId is required"),
        ({"colour": "blue"}, "config.colour is not a field of a Feishu bot"),
        ({"appId": 7}, "config.appId must be a string of at most 512 characters"),
    ],
)
async def test_save_refuses_a_bad_config(
    client: httpx.AsyncClient, bot_key: BotKey, config: dict[str, Any], message: str
) -> None:
    body = {"name": BOT, "provider": "feishu", "config": {**_config(bot_key.api_key), **config}}
    _failure(await client.post("/admin/bot/feishu/save", json=body), 400, message)
    assert (await client.get("/admin/bot/feishu/list")).json()["data"]["items"] == []


async def test_a_disabled_or_deleted_key_is_not_a_valid_api_key(client: httpx.AsyncClient, bot_key: BotKey) -> None:
    other = await _apply_key(client, "soon-gone")
    r = await client.post("/admin/api-key/delete", json={"id": other.key_id})
    assert r.status_code == 200, r.text
    body = {"name": BOT, "provider": "feishu", "config": _config(other.api_key)}
    _failure(await client.post("/admin/bot/feishu/save", json=body), 400, "config.apiKey is not a valid API key")


async def test_duplicate_name_is_409(client: httpx.AsyncClient, bot_key: BotKey) -> None:
    first = await _save_bot(client, _config(bot_key.api_key))
    body = {"name": BOT, "provider": "feishu", "config": _config(bot_key.api_key)}
    _failure(await client.post("/admin/bot/feishu/save", json=body), 409, f"{BOT}@[feishu] already exists")
    items = (await client.get("/admin/bot-connector/list")).json()["data"]["items"]
    assert [(b["id"], b["name"]) for b in items] == [(first["id"], BOT)]


async def test_renaming_onto_an_existing_name_is_409(client: httpx.AsyncClient, bot_key: BotKey) -> None:
    first = await _save_bot(client, _config(bot_key.api_key))
    second = await _save_bot(client, _config(bot_key.api_key), name="other")
    r = await client.post("/admin/bot/feishu/save", json={"id": second["id"], "name": BOT})
    _failure(r, 409, f"{BOT}@[feishu] already exists")
    items = (await client.get("/admin/bot-connector/list")).json()["data"]["items"]
    assert [(b["id"], b["name"]) for b in items] == [(second["id"], "other"), (first["id"], BOT)]


async def test_delete_then_detail_is_404(client: httpx.AsyncClient, feishu: FakeFeishu, bot_key: BotKey) -> None:
    bot_id = (await _save_bot(client, _config(bot_key.api_key)))["id"]
    r = await client.post(HOOK, json=_message("ev1", "om_1"))  # an event taken: its row must not block deletion
    assert r.status_code == 200
    await feishu.wait_for_replies(1)
    r = await client.post("/admin/bot/feishu/delete", json={"id": bot_id})
    assert r.json() == {"success": True, "data": True}
    _failure(await client.get(f"/admin/bot/feishu/detail/{bot_id}"), 404, f"bot {bot_id} is not found")
    _failure(await client.post("/admin/bot-connector/delete", json={"id": bot_id}), 404, f"bot {bot_id} is not found")
    assert (await client.get("/admin/bot/feishu/list")).json()["data"]["items"] == []
    _failure(await client.post(HOOK, json=_message("ev2", "om_2")), 404, f"bot {BOT} is not found")


async def test_list_searches_and_pages(client: httpx.AsyncClient, bot_key: BotKey) -> None:
    ids = [(await _save_bot(client, _config(bot_key.api_key), name=f"bot-{i}"))["id"] for i in range(3)]
    data = (await client.get("/admin/bot-connector/list", params={"limit": 2, "offset": 1})).json()["data"]
    assert (data["total"], data["limit"], data["offset"]) == (3, 2, 1)
    assert [b["id"] for b in data["items"]] == [ids[1], ids[0]]
    data = (await client.get("/admin/bot/feishu/list", params={"q": "bot-2"})).json()["data"]
    assert [b["name"] for b in data["items"]] == ["bot-2"]


async def test_bot_routes_are_for_admins_only(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, bot_key: BotKey
) -> None:
    bot_id = (await _save_bot(client, _config(bot_key.api_key)))["id"]
    user = {"Authorization": f"Bearer {bot_key.api_key}"}
    for path in ("/admin/bot/feishu/list", "/admin/bot-connector/list", f"/admin/bot/feishu/detail/{bot_id}"):
        _failure(await anon_client.get(path, headers=user), 403, NOT_ADMIN)
        _failure(await anon_client.get(path), 401, "Unauthorized: api key required")
    body = {"name": "intruder", "provider": "feishu", "config": _config(bot_key.api_key)}
    _failure(await anon_client.post("/admin/bot/feishu/save", json=body, headers=user), 403, NOT_ADMIN)
    _failure(await anon_client.post("/admin/bot/feishu/delete", json={"id": bot_id}, headers=user), 403, NOT_ADMIN)
    assert [b["name"] for b in (await client.get("/admin/bot/feishu/list")).json()["data"]["items"]] == [BOT]


# -- the receiver ----------------------------------------------------------------------------


async def test_url_verification_echoes_the_challenge(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, bot_key: BotKey
) -> None:
    await _save_bot(client, _config(bot_key.api_key))  # Feishu posts its events without any key
    r = await anon_client.post(HOOK, json={"type": "url_verification", "challenge": "abc", "token": "t"})
    assert (r.status_code, r.json()) == (200, {"challenge": "abc"})


async def test_unknown_bot_is_404(anon_client: httpx.AsyncClient) -> None:
    r = await anon_client.post("/bot/feishu/nobody/webhook/event", json={"type": "url_verification"})
    _failure(r, 404, "bot nobody is not found")


async def test_message_is_answered_once_through_the_gateway_as_the_bots_key(
    client: httpx.AsyncClient,
    anon_client: httpx.AsyncClient,
    *,
    deps: Deps,
    feishu: FakeFeishu,
    engine: Engine,
    bot_key: BotKey,
) -> None:
    await _save_bot(client, _config(bot_key.api_key))
    event = _message("ev1", "om_1")
    r = await anon_client.post(HOOK, json=event)
    assert (r.status_code, r.json()) == (200, {})
    [reply] = await feishu.wait_for_replies(1)
    completion = await _engine_completion(engine, "hello")
    assert completion.strip()
    assert (reply.message_id, reply.text) == ("om_1", completion)
    assert reply.token in feishu.issued

    await deps.records.flush()
    [thread] = (await client.get("/admin/thread/list")).json()["data"]["items"]
    assert (thread["prompt"], thread["completion"]) == ("hello", completion)
    [session] = (await client.get("/admin/session/list")).json()["data"]["items"]
    assert (session["key"], session["key_id"]) == ("oc_1", bot_key.key_id)
    assert thread["session_id"] == session["id"]
    key = (await client.get(f"/admin/api-key/detail/{bot_key.key_id}")).json()["data"]
    assert key["total_fee"] == thread["fee"] != 0  # billed to the bot's key

    # Feishu delivers the same event again: acknowledged, not answered twice.
    r = await anon_client.post(HOOK, json=event)
    assert (r.status_code, r.json()) == (200, {})
    r = await anon_client.post(HOOK, json=_message("ev2", "om_2", "again"))
    assert (r.status_code, r.json()) == (200, {})
    await feishu.wait_for_replies(2)
    await _answers_done()
    assert [x.message_id for x in feishu.replies] == ["om_1", "om_2"]
    assert feishu.replies[1].text == await _engine_completion(engine, "again")
    assert feishu.token_requests == 1  # the tenant token is cached per app


async def test_mentions_are_stripped_from_the_prompt(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, feishu: FakeFeishu, bot_key: BotKey
) -> None:
    await _save_bot(client, _config(bot_key.api_key))
    r = await anon_client.post(HOOK, json=_message("ev1", "om_1", "@_user_1 what is up"))
    assert r.status_code == 200
    await feishu.wait_for_replies(1)
    await deps.records.flush()
    [thread] = (await client.get("/admin/thread/list")).json()["data"]["items"]
    assert thread["prompt"] == "what is up"


async def test_event_for_another_app_is_403(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, bot_key: BotKey
) -> None:
    await _save_bot(client, _config(bot_key.api_key))
    event = _message("ev1", "om_1")
    event["header"]["app_id"] = "cli_other"
    _failure(await anon_client.post(HOOK, json=event), 403, "the event is not for this bot's app")
    await _answers_done()
    assert await deps.records.flush() == 0


async def test_non_text_message_gets_the_text_only_reply(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, feishu: FakeFeishu, bot_key: BotKey
) -> None:
    await _save_bot(client, _config(bot_key.api_key))
    event = _message("ev1", "om_img", message_type="image", content=json.dumps({"image_key": "img_1"}))
    r = await anon_client.post(HOOK, json=event)
    assert (r.status_code, r.json()) == (200, {})
    [reply] = await feishu.wait_for_replies(1)
    assert (reply.message_id, reply.text) == ("om_img", "Only text messages are supported.")
    assert await deps.records.flush() == 0  # no gateway call


async def test_other_events_are_acknowledged_and_ignored(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, feishu: FakeFeishu, bot_key: BotKey
) -> None:
    await _save_bot(client, _config(bot_key.api_key))
    event = _message("ev1", "om_1")
    event["header"]["event_type"] = "im.chat.member.bot.added_v1"
    assert (await anon_client.post(HOOK, json=event)).json() == {}
    # The same id as a message afterwards is still answered: the ignored event was not taken.
    event["header"]["event_type"] = "im.message.receive_v1"
    assert (await anon_client.post(HOOK, json=event)).json() == {}
    [reply] = await feishu.wait_for_replies(1)
    assert reply.message_id == "om_1"


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"[1, 2]", b"\xff\xfe", b""],
    ids=["malformed", "array", "not-utf8", "empty"],
)
async def test_a_body_that_is_not_a_json_object_is_400(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, bot_key: BotKey, raw: bytes
) -> None:
    await _save_bot(client, _config(bot_key.api_key))
    r = await anon_client.post(HOOK, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["success"] is False


async def test_encrypted_bot_takes_only_encrypted_signed_events(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, feishu: FakeFeishu, engine: Engine, bot_key: BotKey
) -> None:
    await _save_bot(client, _config(bot_key.api_key, encryptKey=ENCRYPT_KEY))
    challenge = {"type": "url_verification", "challenge": "abc", "token": "t"}

    _failure(await anon_client.post(HOOK, json=challenge), 400, "the bot has an encryptKey: events must be encrypted")
    wrong = {"encrypt": encrypt_event("another-key", challenge)}
    _failure(await anon_client.post(HOOK, json=wrong), 400, UNSIGNED)

    # Feishu's URL verification comes unsigned, as its own SDK expects.
    r = await anon_client.post(HOOK, json={"encrypt": encrypt_event(ENCRYPT_KEY, challenge)})
    assert (r.status_code, r.json()) == (200, {"challenge": "abc"})

    raw = json.dumps({"encrypt": encrypt_event(ENCRYPT_KEY, challenge)}).encode()
    signed = _signed(raw)
    r = await anon_client.post(HOOK, content=raw, headers=signed)
    assert (r.status_code, r.json()) == (200, {"challenge": "abc"})
    now = signed["X-Lark-Request-Timestamp"]
    forged = {**signed, "X-Lark-Signature": signature(now, "nonce-1", "another-key", raw)}
    _failure(await anon_client.post(HOOK, content=raw, headers=forged), 400, "the event's signature does not match")
    replayed = {**signed, "X-Lark-Request-Nonce": "nonce-2"}
    _failure(await anon_client.post(HOOK, content=raw, headers=replayed), 400, "the event's signature does not match")

    # A message event, encrypted and signed, is answered like a plain one.
    raw = json.dumps({"encrypt": encrypt_event(ENCRYPT_KEY, _message("ev1", "om_1"))}).encode()
    r = await anon_client.post(HOOK, content=raw, headers=_signed(raw))
    assert (r.status_code, r.json()) == (200, {})
    [reply] = await feishu.wait_for_replies(1)
    assert (reply.message_id, reply.text) == ("om_1", await _engine_completion(engine, "hello"))


async def test_plain_bot_refuses_an_encrypted_event(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, bot_key: BotKey
) -> None:
    await _save_bot(client, _config(bot_key.api_key))
    body = {"encrypt": encrypt_event(ENCRYPT_KEY, {"type": "url_verification", "challenge": "abc"})}
    _failure(await anon_client.post(HOOK, json=body), 400, "the event is encrypted but the bot has no encryptKey")


async def test_unbound_model_relays_the_gateways_refusal(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, feishu: FakeFeishu, bot_key: BotKey
) -> None:
    await _save_bot(client, _config(bot_key.api_key))
    r = await client.post(
        "/admin/api-key/bind-or-unbind-model", json={"key_id": bot_key.key_id, "model_id": bot_key.model_id}
    )
    assert r.json() == {"success": True, "data": "deleted"}
    r = await anon_client.post(HOOK, json=_message("ev1", "om_1"))
    assert (r.status_code, r.json()) == (200, {})
    [reply] = await feishu.wait_for_replies(1)
    assert reply.message_id == "om_1"
    assert reply.text.startswith(FORBIDDEN), reply.text
    assert f"[{MODEL}]" in reply.text


async def test_an_unsigned_event_to_a_bot_with_an_encrypt_key_is_refused(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, engine: Engine, feishu: FakeFeishu, bot_key: BotKey
) -> None:
    """Only someone holding the key can sign; encrypting alone proves nothing about the sender's headers."""
    await _save_bot(client, _config(bot_key.api_key, encryptKey=ENCRYPT_KEY))
    raw = json.dumps({"encrypt": encrypt_event(ENCRYPT_KEY, _message("ev1", "om_1"))}).encode()
    headers = {"Content-Type": "application/json"}
    _failure(await anon_client.post(HOOK, content=raw, headers=headers), 400, UNSIGNED)
    garbage = json.dumps({"encrypt": encrypt_event("another-key", _message("ev2", "om_2"))}).encode()
    _failure(await anon_client.post(HOOK, content=garbage, headers=headers), 400, UNSIGNED)  # the same answer

    await _answers_done()
    assert feishu.replies == []
    assert await engine.chats() == []  # nothing was asked of the model either
    r = await anon_client.post(HOOK, content=raw, headers=_signed(raw))  # the same event, signed: taken
    assert (r.status_code, r.json()) == (200, {})
    [reply] = await feishu.wait_for_replies(1)
    assert reply.message_id == "om_1"


@pytest.mark.parametrize("offset_s", [-301, 301, -86_400])
async def test_a_signed_event_out_of_the_time_window_is_refused(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, engine: Engine, bot_key: BotKey, offset_s: int
) -> None:
    await _save_bot(client, _config(bot_key.api_key, encryptKey=ENCRYPT_KEY))
    raw = json.dumps({"encrypt": encrypt_event(ENCRYPT_KEY, _message("ev1", "om_1"))}).encode()
    r = await anon_client.post(HOOK, content=raw, headers=_signed(raw, at=time.time() + offset_s))
    _failure(r, 400, "the event's timestamp is more than 300 s from now")
    await _answers_done()
    assert await engine.chats() == []


async def test_a_signed_event_within_the_window_is_taken_once(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, feishu: FakeFeishu, bot_key: BotKey
) -> None:
    """A little clock skew either way is fine; a replay inside the window is the same event id, answered once."""
    await _save_bot(client, _config(bot_key.api_key, encryptKey=ENCRYPT_KEY))
    raw = json.dumps({"encrypt": encrypt_event(ENCRYPT_KEY, _message("ev1", "om_1"))}).encode()
    for at in (time.time() - 240, time.time() + 240):
        r = await anon_client.post(HOOK, content=raw, headers=_signed(raw, at=at))
        assert (r.status_code, r.json()) == (200, {}), r.text
    await _answers_done()
    assert [reply.message_id for reply in await feishu.wait_for_replies(1)] == ["om_1"]


async def test_a_signed_event_with_a_timestamp_that_is_not_a_number_is_refused(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, bot_key: BotKey
) -> None:
    await _save_bot(client, _config(bot_key.api_key, encryptKey=ENCRYPT_KEY))
    raw = json.dumps({"encrypt": encrypt_event(ENCRYPT_KEY, _message("ev1", "om_1"))}).encode()
    headers = {**_signed(raw), "X-Lark-Request-Timestamp": "soon"}
    headers["X-Lark-Signature"] = signature("soon", "nonce-1", ENCRYPT_KEY, raw)
    _failure(
        await anon_client.post(HOOK, content=raw, headers=headers),
        400,
        "the event's timestamp is not a number of seconds",
    )
