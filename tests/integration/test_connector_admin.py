"""The Bedrock connector's admin API route by route: auth, keys and payments, priced models (the orchestrator's
own models), groups and model bindings, and bad input answered with the envelope, never a 500.

The helpers are in tests/support/connector.py, shared with test_connector_records.py."""

from __future__ import annotations

import re

import httpx
import pytest
from sqlmodel import col, select

from orchestrator.runtime.container import Deps
from orchestrator.store.db import make_sessions
from orchestrator.store.tables import GroupModel, KeyModel
from tests.support.connector import (
    BAD_KEY,
    Client,
    Json,
    Owner,
    Param,
    apply_key,
    bindings,
    data,
    failed,
    get,
    listing,
    mine,
    names,
    post,
    rejected,
    save_group,
    save_model,
    toggle,
)
from tests.support.settings import ADMIN_KEY

NO_KEY = "Unauthorized: api key required"
NOT_ADMIN = "Unauthorized: you are not an admin role."
KEY_INVALID = "api_key or id is invalid"
KEY_REQUIRED = "api_key or id is required"
BR_KEY = re.compile(r"^br-[A-Za-z0-9]{29}$")


# -- auth ----------------------------------------------------------------------------------------


async def test_admin_routes_need_a_known_admin_key(client: Client, anon_client: Client) -> None:
    failed(await get(anon_client, "/admin/api-key/list"), 401, NO_KEY)
    failed(await get(anon_client, "/admin/api-key/list", "br-nobody"), 401, BAD_KEY)
    failed(await post(anon_client, "/admin/model/save", {"name": "x"}, "br-nobody"), 401, BAD_KEY)

    user = await apply_key(client, "user-key")
    admin = await apply_key(client, "admin-key", role="admin")
    assert (user["role"], admin["role"]) == ("user", "admin")
    failed(await get(anon_client, "/admin/api-key/list", user["api_key"]), 403, NOT_ADMIN)
    failed(await post(anon_client, "/admin/group/save", {"name": "g"}, user["api_key"]), 403, NOT_ADMIN)
    failed(await get(anon_client, "/admin/statistics/total", user["api_key"]), 403, NOT_ADMIN)
    # A key applied with role admin is an admin of this API, like the server's own key.
    page = await listing(anon_client, "/admin/api-key/list", admin["api_key"])
    assert sorted(names(page)) == ["admin-key", "user-key"]
    group = data(await post(anon_client, "/admin/group/save", {"name": "by-admin-key"}, admin["api_key"]))
    assert group["name"] == "by-admin-key"
    # A change of role holds from the next call.
    data(await post(client, "/admin/api-key/update", {"id": admin["id"], "role": "user"}))
    failed(await get(anon_client, "/admin/api-key/list", admin["api_key"]), 403, NOT_ADMIN)
    data(await post(client, "/admin/api-key/update", {"id": user["id"], "role": "admin"}))
    assert (await listing(anon_client, "/admin/group/list", user["api_key"]))["total"] == 1
    # The toolkit's keys are users here.
    toolkit = (await client.post("/api/v1/generate_api_key", json={"user_id": "tk"})).json()["api_key"]
    failed(await get(anon_client, "/admin/api-key/list", toolkit), 403, NOT_ADMIN)


async def test_user_routes_take_any_valid_key(client: Client, anon_client: Client) -> None:
    user = await apply_key(client, "someone", email="someone@example.com")
    me = data(await mine(anon_client, user["api_key"]))
    assert (me["id"], me["name"], me["email"], me["role"]) == (user["id"], "someone", "someone@example.com", "user")
    assert "api_key" not in me
    failed(await get(anon_client, "/user/api-key/mine"), 401, NO_KEY)
    failed(await mine(anon_client, "br-" + "x" * 29), 401, BAD_KEY)
    failed(await get(anon_client, "/user/session/list"), 401, NO_KEY)
    failed(await get(anon_client, "/user/thread/list", "nope"), 401, BAD_KEY)
    assert data(await mine(anon_client, ADMIN_KEY)) == {"id": 0, "name": "admin", "role": "admin", "kind": "server"}


# -- keys ----------------------------------------------------------------------------------------


async def test_apply_returns_the_key_once(client: Client, anon_client: Client) -> None:
    key = await apply_key(client, "alice", email="alice@example.com", month_quota=5, balance=2.5)
    assert BR_KEY.match(key["api_key"]), key["api_key"]
    expected = {"name": "alice", "email": "alice@example.com", "role": "user", "month_quota": 5.0, "balance": 2.5}
    assert {k: key[k] for k in expected} == expected
    assert (key["group_id"], key["month_fee"], key["total_fee"], key["kind"]) == (0, 0.0, 0.0, "connector")
    assert key["key_hint"]
    assert key["key_hint"] in key["api_key"]
    plain = key["api_key"]

    [listed] = (await listing(client, "/admin/api-key/list"))["items"]
    detail = data(await get(client, f"/admin/api-key/detail/{key['id']}"))
    for shown in (listed, detail):
        assert "api_key" not in shown
        assert (shown["id"], shown["key_hint"], shown["balance"]) == (key["id"], key["key_hint"], 2.5)
    assert listed["group_name"] == ""
    assert {k: v for k, v in listed.items() if k != "group_name"} == detail
    assert {k: v for k, v in key.items() if k != "api_key"} == detail
    for r in (
        await get(client, "/admin/api-key/list"),
        await get(client, f"/admin/api-key/detail/{key['id']}"),
        await mine(anon_client, plain),
        await client.get("/api/v1/tables/api_key"),
    ):
        assert plain not in r.text
    [row] = (await client.get("/api/v1/tables/api_key")).json()["data"]
    assert row["key_hash"] == "<redacted>"
    failed(await get(client, "/admin/api-key/detail/999"), 404, KEY_INVALID)


async def test_apply_defaults_and_bad_fields(client: Client) -> None:
    key = await apply_key(client, "bare")
    assert (key["email"], key["role"], key["month_quota"], key["balance"], key["group_id"]) == (None, "user", 0, 0, 0)
    failed(await post(client, "/admin/api-key/apply", {}), 400, "name is required")
    failed(await post(client, "/admin/api-key/apply", {"email": "x@y.z"}), 400, "name is required")
    failed(
        await post(client, "/admin/api-key/apply", {"name": "n", "month_quota": -1}),
        400,
        "month_quota must not be negative",
    )
    failed(
        await post(client, "/admin/api-key/apply", {"name": "n", "balance": -0.5}), 400, "balance must not be negative"
    )
    assert "role" in rejected(await post(client, "/admin/api-key/apply", {"name": "n", "role": "root"}))
    failed(await post(client, "/admin/api-key/apply", {"name": "n", "group_id": 999}), 404, "group 999 is not found")
    assert (await listing(client, "/admin/api-key/list"))["total"] == 1


async def test_update_changes_only_the_fields_given(client: Client) -> None:
    group = await save_group(client, "team")
    key = await apply_key(client, "old", email="old@example.com", month_quota=1, balance=3)
    body = {"id": key["id"], "name": "new", "month_quota": 7.5, "role": "admin", "group_id": group["id"]}
    updated = data(await post(client, "/admin/api-key/update", body))
    assert {k: updated[k] for k in ("id", "name", "month_quota", "role", "group_id", "email", "balance")} == {
        "id": key["id"],
        "name": "new",
        "month_quota": 7.5,
        "role": "admin",
        "group_id": group["id"],
        "email": "old@example.com",
        "balance": 3.0,
    }
    assert updated["updated_at"] > key["updated_at"]
    assert data(await get(client, f"/admin/api-key/detail/{key['id']}")) == updated
    out_of_group = data(await post(client, "/admin/api-key/update", {"id": key["id"], "group_id": 0}))
    assert (out_of_group["group_id"], out_of_group["name"]) == (0, "new")

    failed(await post(client, "/admin/api-key/update", {"id": 999, "name": "x"}), 404, KEY_INVALID)
    failed(await post(client, "/admin/api-key/update", {"name": "x"}), 400, "id is required")
    failed(
        await post(client, "/admin/api-key/update", {"id": key["id"], "group_id": 999}), 404, "group 999 is not found"
    )
    assert "role" in rejected(await post(client, "/admin/api-key/update", {"id": key["id"], "role": "root"}))
    failed(
        await post(client, "/admin/api-key/update", {"id": key["id"], "month_quota": -2}),
        400,
        "month_quota must not be negative",
    )


async def test_recharge_by_id_or_key_writes_payments(client: Client) -> None:
    key = await apply_key(client, "payer", balance=2.5)
    other = await apply_key(client, "other")
    after_id = data(await post(client, "/admin/api-key/recharge", {"id": key["id"], "balance": 1.5}))
    assert after_id["balance"] == 4.0
    after_key = data(await post(client, "/admin/api-key/recharge", {"api_key": key["api_key"], "balance": 0.25}))
    assert after_key["balance"] == 4.25
    assert "api_key" not in after_key
    data(await post(client, "/admin/api-key/recharge", {"id": other["id"], "balance": 9}))
    for _ in range(3):  # exact money: 0.1 + 0.1 + 0.1 is 0.3
        tenth = data(await post(client, "/admin/api-key/recharge", {"id": other["id"], "balance": "0.1"}))
    assert tenth["balance"] == 9.3

    payments = await listing(client, "/admin/payment/list", key_id=key["id"])
    assert (payments["total"], payments["limit"], payments["offset"]) == (2, 20, 0)
    assert [(p["key_id"], p["fee"]) for p in payments["items"]] == [(key["id"], 0.25), (key["id"], 1.5)]
    assert payments["items"][0]["id"] > payments["items"][1]["id"]
    assert names(await listing(client, "/admin/payment/list"), "fee") == [0.1, 0.1, 0.1, 9.0, 0.25, 1.5]

    recharge = "/admin/api-key/recharge"
    failed(await post(client, recharge, {"balance": 1}), 400, KEY_REQUIRED)
    failed(await post(client, recharge, {"api_key": "", "balance": 1}), 400, KEY_REQUIRED)
    failed(await post(client, recharge, {"id": key["id"]}), 400, "balance is required")
    failed(await post(client, recharge, {"id": key["id"], "balance": 0}), 400, "balance must be greater than 0")
    failed(await post(client, recharge, {"id": key["id"], "balance": -1}), 400, "balance must not be negative")
    failed(await post(client, recharge, {"id": 999, "balance": 1}), 404, KEY_INVALID)
    failed(await post(client, recharge, {"api_key": "br-unknown", "balance": 1}), 404, KEY_INVALID)
    assert data(await get(client, f"/admin/api-key/detail/{key['id']}"))["balance"] == 4.25
    assert (await listing(client, "/admin/payment/list", key_id=key["id"]))["total"] == 2


async def test_key_list_filters_pages_and_orders(client: Client) -> None:
    group = await save_group(client, "ops")
    await apply_key(client, "alice", email="alice@corp.example")
    await apply_key(client, "bob", email="bob@home.example")
    await apply_key(client, "corporal", role="admin", group_id=group["id"])
    path = "/admin/api-key/list"

    everyone = await listing(client, path)
    assert (names(everyone), everyone["total"], everyone["limit"], everyone["offset"]) == (
        ["corporal", "bob", "alice"],
        3,
        20,
        0,
    )
    assert names(everyone, "group_name") == ["ops", "", ""]
    assert names(await listing(client, path, q="corp")) == ["corporal", "alice"]  # name or email
    assert names(await listing(client, path, name="bob")) == ["bob"]
    assert names(await listing(client, path, name="bo")) == []  # exact
    assert names(await listing(client, path, role="admin")) == ["corporal"]
    assert names(await listing(client, path, role="user")) == ["bob", "alice"]
    assert names(await listing(client, path, group_id=group["id"])) == ["corporal"]
    assert names(await listing(client, path, q="%")) == []  # LIKE's wildcards are taken literally
    second = await listing(client, path, limit=1, offset=1)
    assert (names(second), second["total"], second["limit"], second["offset"]) == (["bob"], 3, 1, 1)
    assert (await listing(client, path, offset=5))["items"] == []

    alice = (await listing(client, path, name="alice"))["items"][0]
    data(await post(client, "/admin/api-key/update", {"id": alice["id"], "email": "alice@new.example"}))
    assert names(await listing(client, path)) == ["alice", "corporal", "bob"]  # newest updated first


async def test_q_ignores_case_on_every_database(client: Client) -> None:
    await apply_key(client, "Bob", email="Bob@Home.example")
    await save_model(client, "Llama-8B")
    await save_group(client, "Ops")
    assert names(await listing(client, "/admin/api-key/list", q="home")) == ["Bob"]
    assert names(await listing(client, "/admin/model/list", q="llama")) == ["Llama-8B"]
    assert names(await listing(client, "/admin/group/list", q="OPS")) == ["Ops"]


async def test_group_id_zero_lists_the_keys_in_no_group(client: Client) -> None:
    group = await save_group(client, "ops")
    await apply_key(client, "loner")
    await apply_key(client, "member", group_id=group["id"])
    assert names(await listing(client, "/admin/api-key/list", group_id=0)) == ["loner"]


async def test_reset_key_replaces_the_key(client: Client, anon_client: Client) -> None:
    key = await apply_key(client, "resettable", balance=1)
    old = key["api_key"]
    reset = data(await post(client, "/admin/api-key/reset-key", {"id": key["id"]}))
    new = reset["api_key"]
    assert BR_KEY.match(new)
    assert new != old
    assert (reset["id"], reset["name"], reset["balance"]) == (key["id"], "resettable", 1.0)
    assert reset["key_hint"] != key["key_hint"]
    failed(await mine(anon_client, old), 401, BAD_KEY)
    assert data(await mine(anon_client, new))["id"] == key["id"]

    by_key = data(await post(client, "/admin/api-key/reset-key", {"api_key": new}))
    failed(await mine(anon_client, new), 401, BAD_KEY)
    assert data(await mine(anon_client, by_key["api_key"]))["id"] == key["id"]
    failed(await post(client, "/admin/api-key/reset-key", {}), 400, KEY_REQUIRED)
    failed(await post(client, "/admin/api-key/reset-key", {"id": 999}), 404, KEY_INVALID)
    failed(await post(client, "/admin/api-key/reset-key", {"api_key": old}), 404, KEY_INVALID)


async def test_delete_key_by_id_or_key(client: Client, anon_client: Client) -> None:
    """(The cascade to payments, bindings and chat records: test_connector_records.py.)"""
    first = await apply_key(client, "first")
    second = await apply_key(client, "second")
    assert data(await post(client, "/admin/api-key/delete", {"id": first["id"]})) is True
    assert data(await post(client, "/admin/api-key/delete", {"api_key": second["api_key"]})) is True
    for key in (first, second):
        failed(await mine(anon_client, key["api_key"]), 401, BAD_KEY)
        failed(await get(client, f"/admin/api-key/detail/{key['id']}"), 404, KEY_INVALID)
    assert (await listing(client, "/admin/api-key/list"))["total"] == 0
    failed(await post(client, "/admin/api-key/delete", {"id": first["id"]}), 404, KEY_INVALID)
    failed(await post(client, "/admin/api-key/delete", {}), 400, KEY_REQUIRED)


# -- models --------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ['{"region": "us-east-1"}', {"region": "us-east-1"}], ids=["string", "object"])
async def test_save_model_with_prices_per_million(client: Client, config: str | Json) -> None:
    saved = await save_model(client, "priced", "bedrock", multiple=True, config=config, price_in=1, price_out=15)
    assert {k: saved[k] for k in ("name", "provider", "multiple", "config", "price_in", "price_out")} == {
        "name": "priced",
        "provider": "bedrock",
        "multiple": True,
        "config": {"region": "us-east-1"},
        "price_in": 1e-06,
        "price_out": 1.5e-05,
    }
    [listed] = (await listing(client, "/admin/model/list"))["items"]
    assert listed == saved
    assert data(await get(client, f"/admin/model/detail/{saved['id']}")) == saved
    plain = await save_model(client, "plain")
    assert (plain["multiple"], plain["config"], plain["price_in"], plain["price_out"]) == (False, {}, 0.0, 0.0)


async def test_save_model_refuses_bad_input(client: Client) -> None:
    await save_model(client, "taken")
    save = "/admin/model/save"
    failed(await post(client, save, {"provider": "vllm"}), 400, "name is required")
    failed(await post(client, save, {"name": "n"}), 400, "provider is required")
    failed(await post(client, save, {"name": "taken", "provider": "other"}), 409, "taken already exists")
    failed(
        await post(client, save, {"name": "n", "provider": "p", "config": "not json"}),
        400,
        "config is not valid JSON: Expecting value",
    )
    failed(
        await post(client, save, {"name": "n", "provider": "p", "config": "[1]"}), 400, "config must be a JSON object"
    )
    failed(
        await post(client, save, {"name": "n", "provider": "p", "price_in": -1}), 400, "price_in must not be negative"
    )
    assert "price_out" in rejected(await post(client, save, {"name": "n", "provider": "p", "price_out": "cheap"}))
    assert "multiple" in rejected(await post(client, save, {"name": "n", "provider": "p", "multiple": "sometimes"}))
    assert names(await listing(client, "/admin/model/list")) == ["taken"]


async def test_update_model_by_id(client: Client) -> None:
    model = await save_model(client, "before", price_in=1, price_out=2)
    await save_model(client, "neighbour")
    body = {"id": model["id"], "name": "after", "price_in": 3}
    updated = data(await post(client, "/admin/model/save", body))
    assert (updated["id"], updated["name"], updated["provider"]) == (model["id"], "after", "vllm")
    assert (updated["price_in"], updated["price_out"]) == (3e-06, 2e-06)
    assert data(await get(client, f"/admin/model/detail/{model['id']}")) == updated
    renamed = {"id": model["id"], "name": "neighbour"}
    failed(await post(client, "/admin/model/save", renamed), 409, "neighbour already exists")
    failed(await post(client, "/admin/model/save", {"id": 999, "name": "x"}), 404, "Model not found")
    failed(await get(client, "/admin/model/detail/999"), 404, "Model not found")


async def test_model_list_filters(client: Client) -> None:
    await save_model(client, "llama-8b", "vllm")
    await save_model(client, "llama-70b", "bedrock")
    await save_model(client, "mistral", "vllm")
    path = "/admin/model/list"
    assert names(await listing(client, path)) == ["mistral", "llama-70b", "llama-8b"]
    assert names(await listing(client, path, q="llama")) == ["llama-70b", "llama-8b"]
    assert names(await listing(client, path, provider="vllm")) == ["mistral", "llama-8b"]
    assert names(await listing(client, path, q="llama", provider="vllm")) == ["llama-8b"]
    assert names(await listing(client, path, provider="vll")) == []
    page = await listing(client, path, limit=2, offset=2)
    assert (names(page), page["total"]) == (["llama-8b"], 3)


async def binding_rows(deps: Deps, model_id: int) -> int:
    """Rows binding the model to keys and groups, as stored (the model row itself stays, soft-deleted)."""
    async with make_sessions(deps.engine)() as s:
        keys = (await s.exec(select(KeyModel).where(col(KeyModel.model_id) == model_id))).all()
        groups = (await s.exec(select(GroupModel).where(col(GroupModel.model_id) == model_id))).all()
    return len(keys) + len(groups)


async def test_delete_model_drops_it_and_its_bindings(client: Client, deps: Deps) -> None:
    model = await save_model(client, "doomed")
    kept = await save_model(client, "kept")
    key = await apply_key(client, "k")
    group = await save_group(client, "g")
    owners: list[tuple[Owner, int]] = [("api-key", key["id"]), ("group", group["id"])]
    for owner, owner_id in owners:
        for m in (model, kept):
            assert await toggle(client, owner, owner_id, m["id"]) == "created"
    assert data(await post(client, "/admin/model/delete", {"id": model["id"]})) is True
    assert names(await listing(client, "/admin/model/list")) == ["kept"]
    assert [m["name"] for m in (await client.get("/api/v1/models")).json()] == ["kept"]
    assert await bindings(client, "api-key", key["id"]) == [(kept["id"], "kept")]
    assert await bindings(client, "group", group["id"]) == [(kept["id"], "kept")]
    assert (await binding_rows(deps, model["id"]), await binding_rows(deps, kept["id"])) == (0, 2)
    failed(await get(client, f"/admin/model/detail/{model['id']}"), 404, "Model not found")
    failed(await post(client, "/admin/model/delete", {"id": model["id"]}), 404, "Model not found")
    failed(
        await post(client, "/admin/api-key/bind-or-unbind-model", {"key_id": key["id"], "model_id": model["id"]}),
        404,
        f"model {model['id']} is not found",
    )
    failed(await post(client, "/admin/model/delete", {}), 400, "id is required")
    # The name is free again.
    assert (await save_model(client, "doomed"))["id"] != model["id"]


# -- groups and bindings -------------------------------------------------------------------------


async def test_group_save_list_detail(client: Client) -> None:
    group = await save_group(client, "team", key="team-key")
    assert (group["name"], group["key"]) == ("team", "team-key")
    other = await save_group(client, "other")
    updated = data(await post(client, "/admin/group/save", {"id": group["id"], "name": "team2", "key": "k2"}))
    assert (updated["id"], updated["name"], updated["key"]) == (group["id"], "team2", "k2")
    assert data(await get(client, f"/admin/group/detail/{group['id']}")) == updated
    page = await listing(client, "/admin/group/list")
    assert (names(page), page["total"]) == (["team2", "other"], 2)
    assert names(await listing(client, "/admin/group/list", q="team")) == ["team2"]

    save = "/admin/group/save"
    failed(await post(client, save, {"name": "team2"}), 409, "team2 already exists")
    failed(await post(client, save, {"id": other["id"], "name": "team2"}), 409, "team2 already exists")
    failed(await post(client, save, {}), 400, "name is required")
    failed(await post(client, save, {"id": 999, "name": "x"}), 404, "group 999 is not found")
    failed(await get(client, "/admin/group/detail/999"), 404, "group 999 is not found")
    assert names(await listing(client, "/admin/group/list")) == ["team2", "other"]


async def test_delete_group_leaves_its_keys_in_no_group(client: Client) -> None:
    group = await save_group(client, "leaving")
    model = await save_model(client, "m")
    key = await apply_key(client, "member", group_id=group["id"])
    assert await toggle(client, "group", group["id"], model["id"]) == "created"
    assert data(await post(client, "/admin/group/delete", {"id": group["id"]})) is True
    detail = data(await get(client, f"/admin/api-key/detail/{key['id']}"))
    assert detail["group_id"] == 0
    assert names(await listing(client, "/admin/api-key/list"), "group_name") == [""]
    assert (await listing(client, "/admin/group/list"))["total"] == 0
    assert (await listing(client, "/admin/group/list-model"))["total"] == 0
    failed(await post(client, "/admin/group/delete", {"id": group["id"]}), 404, f"group {group['id']} is not found")


@pytest.mark.parametrize("owner", ["api-key", "group"])
async def test_bind_or_unbind_toggles(client: Client, owner: Owner) -> None:
    first, second = await save_model(client, "first"), await save_model(client, "second")
    owner_id = (
        (await apply_key(client, "holder"))["id"] if owner == "api-key" else (await save_group(client, "holders"))["id"]
    )
    assert await toggle(client, owner, owner_id, first["id"]) == "created"
    assert await toggle(client, owner, owner_id, second["id"]) == "created"
    assert await bindings(client, owner, owner_id) == [(first["id"], "first"), (second["id"], "second")]
    field = "key" if owner == "api-key" else "group"
    [row, _] = (await listing(client, f"/admin/{owner}/list-model", **{f"{field}_id": owner_id}))["items"]
    assert row[f"{field}_name"] == "holder" + ("" if owner == "api-key" else "s")
    assert await toggle(client, owner, owner_id, first["id"]) == "deleted"
    assert await bindings(client, owner, owner_id) == [(second["id"], "second")]
    assert await toggle(client, owner, owner_id, first["id"]) == "created"
    assert await bindings(client, owner, owner_id) == [(second["id"], "second"), (first["id"], "first")]

    path = f"/admin/{owner}/bind-or-unbind-model"
    missing_owner = KEY_INVALID if owner == "api-key" else "group 999 is not found"
    failed(await post(client, path, {f"{field}_id": owner_id, "model_id": 999}), 404, "model 999 is not found")
    failed(await post(client, path, {f"{field}_id": 999, "model_id": first["id"]}), 404, missing_owner)
    failed(await post(client, path, {f"{field}_id": owner_id}), 400, "model_id is required")
    failed(await post(client, path, {"model_id": first["id"]}), 400, f"{field}_id is required")
    assert len(await bindings(client, owner, owner_id)) == 2


# -- bad input -----------------------------------------------------------------------------------

LISTS = [
    "/admin/api-key/list",
    "/admin/api-key/list-model",
    "/admin/payment/list",
    "/admin/model/list",
    "/admin/group/list",
    "/admin/group/list-model",
    "/admin/session/list",
    "/admin/thread/list",
    "/user/session/list",
    "/user/thread/list",
]
BAD_PAGES: list[dict[str, Param]] = [
    {"limit": "abc"},
    {"limit": 0},
    {"limit": -1},
    {"limit": 1001},
    {"limit": "1.5"},
    {"offset": -1},
    {"offset": "x"},
    {"offset": 2**31},
]
POSTS = [
    "/admin/api-key/apply",
    "/admin/api-key/update",
    "/admin/api-key/recharge",
    "/admin/api-key/reset-key",
    "/admin/api-key/delete",
    "/admin/api-key/bind-or-unbind-model",
    "/admin/model/save",
    "/admin/model/delete",
    "/admin/group/save",
    "/admin/group/delete",
    "/admin/group/bind-or-unbind-model",
]
BAD_BODIES = [b"", b"not json", b"{", b"[1, 2]", b'"text"', b"null", b"42"]
BAD_IDS = [b'{"id": "abc"}', b'{"id": 0}', b'{"id": -1}', b'{"id": 1e400}', b'{"id": 99999999999}', b'{"id": [1]}']


async def test_bad_pages_and_filters_are_400s(client: Client) -> None:
    for path in LISTS:
        for params in BAD_PAGES:
            rejected(await get(client, path, **params), (path, params))
    bad_filters: list[tuple[str, dict[str, Param]]] = [
        ("/admin/api-key/list", {"group_id": "g"}),
        ("/admin/api-key/list", {"q": "x" * 256}),
        ("/admin/payment/list", {"key_id": -1}),
        ("/admin/thread/list", {"session_id": "s-1"}),
        ("/admin/session/list", {"key_id": 2**31}),
        ("/user/thread/list", {"session_id": "abc"}),
    ]
    for path, params in bad_filters:
        rejected(await get(client, path, **params), (path, params))
    for path in ("/admin/api-key/detail/0", "/admin/model/detail/0", "/user/session/detail/0"):
        rejected(await get(client, path), path)


async def test_bad_bodies_are_400s(client: Client) -> None:
    for path in POSTS:
        for content in BAD_BODIES:
            r = await client.post(path, content=content, headers={"Content-Type": "application/json"})
            rejected(r, (path, content))
    for path in ("/admin/api-key/update", "/admin/api-key/recharge", "/admin/model/save", "/admin/group/delete"):
        for content in BAD_IDS:
            r = await client.post(path, content=content, headers={"Content-Type": "application/json"})
            rejected(r, (path, content))
    assert (await listing(client, "/admin/api-key/list"))["total"] == 0


async def test_bad_input_messages(client: Client) -> None:
    async def send(content: bytes) -> httpx.Response:
        return await client.post("/admin/api-key/update", content=content, headers={"Content-Type": "application/json"})

    failed(await send(b""), 400, "a JSON object body is required")
    failed(await send(b"not json"), 400, "JSON is malformed: invalid character (byte 4)")
    failed(await send(b"[1]"), 400, "body: Input should be a valid dictionary or instance of UpdateKeyIn")
    failed(
        await send(b'{"id": "abc"}'), 400, "id: Input should be a valid integer, unable to parse string as an integer"
    )
    failed(await send(b'{"id": 0}'), 400, "id: Input should be greater than or equal to 1")
    failed(await post(client, "/admin/api-key/apply", {"name": ["a"]}), 400, "name: Input should be a valid string")
    failed(await get(client, "/admin/api-key/list", limit="abc"), 400, "limit: Expected `int`, got `str`")
    failed(await get(client, "/admin/api-key/list", limit=0), 400, "limit: Expected `int` >= 1")
    failed(await get(client, "/admin/api-key/list", offset=-1), 400, "offset: Expected `int` >= 0")
