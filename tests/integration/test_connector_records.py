"""The connector's admin API against real calls through the gateway (an engine simulator on a real socket): a
model saved there is the orchestrator's own, access by binding (key or group) and the "default" fallback, the
statistics, the chat records (sessions and threads, scoped to their key under /user), and a key's deletion taking
everything it owns along."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from orchestrator.runtime.container import Deps
from tests.support.connector import (
    BAD_KEY,
    Client,
    Json,
    apply_key,
    bearer,
    data,
    failed,
    get,
    listing,
    mine,
    names,
    post,
    save_group,
    save_model,
    toggle,
)
from tests.support.engines import Engine, engine_in_process
from tests.support.gateway import issue_key, make_ready
from tests.support.settings import ADMIN_KEY

MODEL = "conn-model"
PRICE_IN, PRICE_OUT = 1, 3  # dollars per million tokens
NOT_YOUR_SESSION = "Unauthorized: not your session."
NOT_YOUR_THREAD = "Unauthorized: not your thread."


def forbidden(model: str) -> str:
    return f"You do not have permission to access the [{model}] model, please contact the administrator."


async def chat(
    c: Client, key: str, text: str = "hi", *, model: str = MODEL, session: str | None = None, stream: bool = False
) -> httpx.Response:
    headers = bearer(key)
    if session is not None:
        headers["Session-Id"] = session
    body = {"model": model, "messages": [{"role": "user", "content": text}], "stream": stream}
    return await c.post("/v1/chat/completions", json=body, headers=headers)


def served(r: httpx.Response) -> Json:
    assert r.status_code == 200, r.text
    answer: Json = r.json()
    return answer


def openai_failed(r: httpx.Response, status: int, message: str, kind: str, param: str | None = "model") -> None:
    expected = {"error": {"message": message, "type": kind, "param": param, "code": str(status)}}
    assert (r.status_code, r.json()) == (status, expected), r.text


async def visible_models(c: Client, key: str) -> list[Json]:
    r = await c.get("/v1/models", headers=bearer(key))
    assert r.status_code == 200, r.text
    body: Json = r.json()
    assert body["object"] == "list"
    models: list[Json] = body["data"]
    return models


async def threads(c: Client, key: str | None = None, /, **params: str | int) -> list[Json]:
    path = "/admin/thread/list" if key is None else "/user/thread/list"
    items: list[Json] = (await listing(c, path, key, limit=100, **params))["items"]
    return items


async def sessions(c: Client, key: str | None = None, /, **params: str | int) -> list[Json]:
    path = "/admin/session/list" if key is None else "/user/session/list"
    items: list[Json] = (await listing(c, path, key, limit=100, **params))["items"]
    return items


def fees(rows: list[Json]) -> float:
    return sum(float(r["fee"]) for r in rows)


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    async with engine_in_process(MODEL, max_tokens=8) as e:
        yield e


@pytest.fixture
async def model(client: Client, deps: Deps, engine: Engine) -> Json:
    """MODEL, saved through the connector with prices, with a READY replica on the engine simulator."""
    saved = await save_model(client, MODEL, price_in=PRICE_IN, price_out=PRICE_OUT)
    await make_ready(client, deps, MODEL, engine.chat_url)
    return saved


# -- models are the orchestrator's ---------------------------------------------------------------


async def test_saved_model_is_the_orchestrators_model(client: Client, deps: Deps, engine: Engine) -> None:
    saved = await save_model(client, MODEL, price_in=1)
    assert {"id": saved["id"], "name": MODEL} in (await client.get("/api/v1/models")).json()
    assert (await client.get(f"/api/v1/models/{MODEL}")).json()["id"] == saved["id"]
    [replica_id] = await make_ready(client, deps, MODEL, engine.chat_url)  # by name
    replicas = (await client.get(f"/api/v1/models/{saved['id']}/replicas")).json()
    assert [r["id"] for r in replicas] == [replica_id]
    assert [m["name"] for m in (await client.get("/api/v1/models", params={"active": 1})).json()] == [MODEL]
    assert served(await chat(client, ADMIN_KEY))["model"] == MODEL
    # ...and one the toolkit created is listed by the connector too.
    assert (await client.post("/api/v1/models", json={"name": "from-toolkit"})).status_code == 201
    assert names(await listing(client, "/admin/model/list")) == ["from-toolkit", MODEL]


# -- access through the gateway ------------------------------------------------------------------


async def test_access_is_by_key_or_group_binding(client: Client, anon_client: Client, model: Json) -> None:
    vision = await save_model(client, "vision", "bedrock", multiple=True)  # bound later; no replica
    key = await apply_key(client, "caller", month_quota=1)
    plain = key["api_key"]
    openai_failed(await chat(anon_client, plain), 403, forbidden(MODEL), "permission_error")
    assert await visible_models(anon_client, plain) == []

    group = await save_group(client, "team")
    assert await toggle(client, "group", group["id"], model["id"]) == "created"
    openai_failed(await chat(anon_client, plain), 403, forbidden(MODEL), "permission_error")  # not in the group yet
    data(await post(client, "/admin/api-key/update", {"id": key["id"], "group_id": group["id"]}))
    assert served(await chat(anon_client, plain))["model"] == MODEL
    [listed] = await visible_models(anon_client, plain)
    assert isinstance(listed.pop("created"), int)
    assert listed == {"id": MODEL, "object": "model", "owned_by": "vllm", "multiple": False}
    openai_failed(await chat(anon_client, plain, model="vision"), 403, forbidden("vision"), "permission_error")

    assert await toggle(client, "api-key", key["id"], vision["id"]) == "created"
    assert [(m["id"], m["multiple"]) for m in await visible_models(anon_client, plain)] == [
        (MODEL, False),
        ("vision", True),
    ]
    assert await toggle(client, "group", group["id"], model["id"]) == "deleted"
    openai_failed(await chat(anon_client, plain), 403, forbidden(MODEL), "permission_error")
    assert await toggle(client, "api-key", key["id"], model["id"]) == "created"  # bound to the key itself
    assert served(await chat(anon_client, plain))["model"] == MODEL
    data(await post(client, "/admin/group/delete", {"id": group["id"]}))
    assert served(await chat(anon_client, plain))["model"] == MODEL


async def test_unknown_model_is_the_connectors_error(client: Client, anon_client: Client, model: Json) -> None:
    key = await apply_key(client, "caller", month_quota=1)
    assert await toggle(client, "api-key", key["id"], model["id"]) == "created"
    openai_failed(
        await chat(anon_client, key["api_key"], model="nope"),
        400,
        "The model [nope] is not found.",
        "invalid_request_error",
    )
    message = "Invalid model name passed in model=nope. Call `/v1/models` to view available models for your key."
    openai_failed(await chat(anon_client, ADMIN_KEY, model="nope"), 400, message, "invalid_request_error")


async def test_unknown_model_falls_back_to_a_default_model(client: Client, anon_client: Client, deps: Deps) -> None:
    key = await apply_key(client, "caller", month_quota=1)
    _, toolkit_key = await issue_key(client)
    async with engine_in_process("default", max_tokens=8) as engine:
        default = await save_model(client, "default")
        # Saved but not bound: the fallback names the model it fell back to.
        openai_failed(
            await chat(anon_client, key["api_key"], model="nope"), 403, forbidden("default"), "permission_error"
        )
        assert await toggle(client, "api-key", key["id"], default["id"]) == "created"
        await make_ready(client, deps, "default", engine.chat_url)
        assert served(await chat(anon_client, key["api_key"], "fallback", model="nope"))["model"] == "default"
        assert served(await chat(anon_client, key["api_key"], model="default"))["model"] == "default"
        # Only a connector key falls back.
        r = await chat(anon_client, toolkit_key, model="nope")
        assert (r.status_code, r.json()["error"]["param"]) == (400, "model")
    await deps.records.flush()
    first = (await threads(client, key_id=key["id"]))[-1]
    detail = data(await get(client, f"/admin/thread/detail/{first['id']}"))
    assert (detail["prompt"], detail["model"]) == ("fallback", "default")


# -- chat records --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recorded:
    a: Json
    """Key A, bound to MODEL by key, with a month quota: 2 calls in session s-1 and 1 without a session."""
    b: Json
    """Key B, bound through its group, paying from its balance: 1 call in its own session s-1."""
    session_a: Json
    session_b: Json


@pytest.fixture
async def recorded(client: Client, anon_client: Client, deps: Deps, model: Json) -> Recorded:
    group = await save_group(client, "bees")
    a = await apply_key(client, "alice", month_quota=10)
    b = await apply_key(client, "bob", group_id=group["id"], balance=10)
    assert await toggle(client, "api-key", a["id"], model["id"]) == "created"
    assert await toggle(client, "group", group["id"], model["id"]) == "created"
    for key, text, session in [
        (a["api_key"], "zebra one", "s-1"),
        (a["api_key"], "yak two", "s-1"),
        (a["api_key"], "walrus three", None),
        (b["api_key"], "okapi four", "s-1"),
        (ADMIN_KEY, "admin call", "s-1"),  # usage, but no thread and no session
    ]:
        served(await chat(anon_client, key, text, session=session))
    await deps.records.flush()
    [session_a] = await sessions(client, key_id=a["id"])
    [session_b] = await sessions(client, key_id=b["id"])
    return Recorded(a, b, session_a, session_b)


async def test_sessions_sum_their_threads(client: Client, recorded: Recorded) -> None:
    a, session = recorded.a, recorded.session_a
    assert (session["key"], session["key_id"], session["currency"]) == ("s-1", a["id"], "USD")
    in_session = await threads(client, session_id=session["id"])
    assert [t["prompt"] for t in in_session] == ["zebra one", "yak two"]  # oldest first
    assert [t["session_id"] for t in in_session] == [session["id"]] * 2
    assert session["total_in_tokens"] == sum(t["tokens_in"] for t in in_session) > 0
    assert session["total_out_tokens"] == sum(t["tokens_out"] for t in in_session) == 16
    assert session["total_fee"] == pytest.approx(fees(in_session), rel=1e-12)
    assert session["total_fee"] > 0
    assert session["title"] == in_session[-1]["completion"][:30]
    assert session["title"]
    assert data(await get(client, f"/admin/session/detail/{session['id']}")) == session
    assert [s["id"] for s in await sessions(client)] == [recorded.session_b["id"], session["id"]]  # newest first
    assert await sessions(client, q=session["title"][:10]) == await sessions(client)
    assert await sessions(client, q="no such title") == []
    failed(await get(client, "/admin/session/detail/999"), 404, "session 999 is not found")


async def test_thread_lists_filter_and_details(client: Client, recorded: Recorded) -> None:
    a, b = recorded.a, recorded.b
    everything = await threads(client)
    assert [t["prompt"] for t in everything] == ["okapi four", "walrus three", "yak two", "zebra one"]  # no admin call
    assert [t["prompt"] for t in await threads(client, key_id=a["id"])] == ["walrus three", "yak two", "zebra one"]
    assert [t["prompt"] for t in await threads(client, key_id=b["id"])] == ["okapi four"]
    assert [t["prompt"] for t in await threads(client, q="yak")] == ["yak two"]
    assert await threads(client, q="yak", key_id=b["id"]) == []
    s_a, s_b = recorded.session_a["id"], recorded.session_b["id"]
    assert [t["session_id"] for t in everything] == [s_b, None, s_a, s_a]
    page = await listing(client, "/admin/thread/list", limit=2, offset=1)
    assert ([t["prompt"] for t in page["items"]], page["total"]) == (["walrus three", "yak two"], 4)

    detail = data(await get(client, f"/admin/thread/detail/{everything[-1]['id']}"))
    assert {k: detail[k] for k in everything[-1]} == everything[-1]
    assert (detail["key_id"], detail["model"], detail["stream"], detail["status_code"]) == (a["id"], MODEL, False, 200)
    assert (detail["price_in"], detail["price_out"], detail["currency"]) == (PRICE_IN / 1e6, PRICE_OUT / 1e6, "USD")
    assert detail["fee"] == pytest.approx((detail["tokens_in"] * PRICE_IN + detail["tokens_out"] * PRICE_OUT) / 1e6)
    assert "zebra one" in detail["whole_prompt"]
    assert isinstance(detail["invocation_latency"], int)
    failed(await get(client, "/admin/thread/detail/999"), 404, "thread 999 is not found")
    # The server admin's call is a usage row, not a thread.
    metric = (await client.get("/api/v1/tables/metric")).json()["data"]
    assert len(metric) == 5
    [admin_row] = [r for r in metric if r["api_key_id"] is None]
    failed(await get(client, f"/admin/thread/detail/{admin_row['id']}"), 404, f"thread {admin_row['id']} is not found")


async def test_user_records_are_scoped_to_the_caller(client: Client, anon_client: Client, recorded: Recorded) -> None:
    a, b = recorded.a["api_key"], recorded.b["api_key"]
    assert await sessions(anon_client, a) == [recorded.session_a]
    assert await sessions(anon_client, b) == [recorded.session_b]
    assert await threads(anon_client, a) == await threads(client, key_id=recorded.a["id"])
    assert [t["prompt"] for t in await threads(anon_client, b)] == ["okapi four"]
    assert await threads(anon_client, a, session_id=recorded.session_b["id"]) == []  # another's session: nothing
    assert await threads(anon_client, a, q="okapi") == []
    assert [t["prompt"] for t in await threads(anon_client, a, session_id=recorded.session_a["id"])] == [
        "zebra one",
        "yak two",
    ]
    assert await sessions(anon_client, ADMIN_KEY) == []
    assert await threads(anon_client, ADMIN_KEY) == []

    own, other = recorded.session_a["id"], recorded.session_b["id"]
    assert data(await get(anon_client, f"/user/session/detail/{own}", a)) == recorded.session_a
    failed(await get(anon_client, f"/user/session/detail/{other}", a), 403, NOT_YOUR_SESSION)
    failed(await get(anon_client, f"/user/session/detail/{own}", b), 403, NOT_YOUR_SESSION)
    failed(await get(anon_client, "/user/session/detail/999", a), 404, "session 999 is not found")
    [b_thread] = await threads(anon_client, b)
    a_thread = (await threads(anon_client, a))[0]
    assert data(await get(anon_client, f"/user/thread/detail/{b_thread['id']}", b))["prompt"] == "okapi four"
    failed(await get(anon_client, f"/user/thread/detail/{b_thread['id']}", a), 403, NOT_YOUR_THREAD)
    failed(await get(anon_client, f"/user/thread/detail/{a_thread['id']}", b), 403, NOT_YOUR_THREAD)
    failed(await get(anon_client, "/user/thread/detail/999", a), 404, "thread 999 is not found")
    failed(await get(anon_client, f"/user/thread/detail/{a_thread['id']}"), 401, "Unauthorized: api key required")


async def test_a_streamed_call_is_recorded_without_a_title(
    client: Client, anon_client: Client, deps: Deps, model: Json
) -> None:
    key = await apply_key(client, "streamer", month_quota=1)
    assert await toggle(client, "api-key", key["id"], model["id"]) == "created"
    r = await chat(anon_client, key["api_key"], "flowing", session="s-2", stream=True)
    assert r.status_code == 200, r.text
    assert r.text.rstrip().endswith("data: [DONE]")
    await deps.records.flush()
    [session] = await sessions(client, key_id=key["id"])
    [thread] = await threads(client, session_id=session["id"])
    detail = data(await get(client, f"/admin/thread/detail/{thread['id']}"))
    assert (session["title"], detail["stream"], detail["thread_type"], detail["tokens_out"]) == (None, True, 0, 8)
    assert isinstance(detail["first_byte_latency"], float | int)
    assert session["total_out_tokens"] == 8


# -- statistics and the key's own view -----------------------------------------------------------


async def test_statistics_follow_the_fees(client: Client, anon_client: Client, recorded: Recorded) -> None:
    await apply_key(client, "idle")
    all_threads = await threads(client)
    a_fees = fees(await threads(client, key_id=recorded.a["id"]))
    totals = data(await get(client, "/admin/statistics/total"))
    assert set(totals) == {"count_key", "active_key", "active_key_this_month", "total_fee", "total_month_fee"}
    assert (totals["count_key"], totals["active_key"], totals["active_key_this_month"]) == (3, 2, 2)
    assert totals["total_fee"] == pytest.approx(fees(all_threads), rel=1e-12)
    assert totals["total_month_fee"] == pytest.approx(a_fees, rel=1e-12)  # B pays from its balance, not a quota
    me = data(await mine(anon_client, recorded.a["api_key"]))
    assert (me["month_fee"], me["total_fee"], me["balance"]) == (pytest.approx(a_fees), pytest.approx(a_fees), 0)
    bob = data(await mine(anon_client, recorded.b["api_key"]))
    b_fees = fees(await threads(client, key_id=recorded.b["id"]))
    assert (bob["month_fee"], bob["balance"]) == (0, pytest.approx(10 - b_fees))


async def test_statistics_start_at_zero(client: Client) -> None:
    totals = data(await get(client, "/admin/statistics/total"))
    assert totals == {"count_key": 0, "active_key": 0, "active_key_this_month": 0, "total_fee": 0, "total_month_fee": 0}


# -- deleting a key ------------------------------------------------------------------------------


async def test_deleting_a_key_takes_everything_it_owns(
    client: Client, anon_client: Client, deps: Deps, recorded: Recorded
) -> None:
    a, b = recorded.a, recorded.b
    data(await post(client, "/admin/api-key/recharge", {"id": a["id"], "balance": 2}))
    data(await post(client, "/admin/api-key/recharge", {"id": b["id"], "balance": 3}))
    served(await chat(anon_client, a["api_key"], "in flight", session="s-9"))  # not yet written when A goes
    assert data(await post(client, "/admin/api-key/delete", {"id": a["id"]})) is True
    await deps.records.flush()

    async def total(path: str, **params: Any) -> int:
        return int((await listing(client, path, **params))["total"])

    for path in ("/admin/payment/list", "/admin/api-key/list-model", "/admin/session/list", "/admin/thread/list"):
        assert await total(path, key_id=a["id"]) == 0, path
    failed(await mine(anon_client, a["api_key"]), 401, BAD_KEY)
    openai_failed(await chat(anon_client, a["api_key"]), 401, "Invalid API key.", "authentication_error", None)
    failed(
        await get(client, f"/admin/session/detail/{recorded.session_a['id']}"),
        404,
        f"session {recorded.session_a['id']} is not found",
    )
    # B keeps all of its own.
    assert await total("/admin/payment/list") == await total("/admin/payment/list", key_id=b["id"]) == 1
    assert await sessions(client) == [recorded.session_b]
    assert [t["prompt"] for t in await threads(client)] == ["okapi four"]
    assert await total("/admin/group/list-model") == 1
    assert served(await chat(anon_client, b["api_key"]))["model"] == MODEL
    assert data(await get(client, "/admin/statistics/total"))["count_key"] == 1
