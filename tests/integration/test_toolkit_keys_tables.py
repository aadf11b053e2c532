"""The toolkit's API key and table routes, and admin authentication."""

from __future__ import annotations

import httpx
import pytest

from orchestrator.platform.secrets import hash_api_key
from orchestrator.runtime.container import Deps
from orchestrator.store.call_records import CallRow
from tests.support.settings import ADMIN_KEY, SECRET_KEY
from tests.support.toolkit import Client, create_model, create_replica, vm_details

TOOLKIT_TABLES = {"api_key", "llm_models", "replicas", "replica_security_rules", "metric"}


async def test_generate_api_key_returns_the_key_once_and_stores_only_its_hmac(client: Client) -> None:
    r = await client.post("/api/v1/generate_api_key", json={"user_id": "alice"})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"api_key", "id", "enabled"}
    assert body["enabled"] is True
    plain = body["api_key"]
    assert plain.startswith("sk-")
    assert len(plain) >= 40

    [row] = (await client.get("/api/v1/tables/api_key")).json()["data"]
    assert row["user_id"] == "alice"
    assert row["allowed_rpm"] == 160
    assert row["key_hash"] == "<redacted>"
    assert plain not in (await client.get("/api/v1/tables/api_key")).text


async def test_stored_hash_is_hmac_sha256_of_the_key(client: Client, deps: Deps) -> None:
    plain = (await client.post("/api/v1/generate_api_key", json={"user_id": "u", "allowed_rpm": 7})).json()["api_key"]
    from sqlmodel import select

    from orchestrator.store.db import make_sessions
    from orchestrator.store.tables import ApiKey

    async with make_sessions(deps.engine)() as s:
        row = (await s.exec(select(ApiKey))).one()
    assert row.key_hash == hash_api_key(SECRET_KEY, plain)
    assert row.allowed_rpm == 7
    assert plain not in row.model_dump_json()


async def test_generate_api_key_needs_user_id(client: Client) -> None:
    r = await client.post("/api/v1/generate_api_key", json={})
    assert (r.status_code, r.json()) == (400, {"errors": {"user_id": ["Missing data for required field."]}})
    r = await client.post("/api/v1/generate_api_key", json={"user_id": ""})
    assert (r.status_code, r.json()) == (400, {"errors": {"user_id": ["Shorter than minimum length 1."]}})


async def _issue(client: Client, user_id: str = "alice") -> int:
    return int((await client.post("/api/v1/generate_api_key", json={"user_id": user_id})).json()["id"])


async def _write_usage(deps: Deps, row: dict[str, object]) -> None:
    """A usage row written the way the record job writes it."""
    await deps.record_store.write_calls([CallRow(row)], [], [])


async def test_delete_unused_key_deletes_it(client: Client) -> None:
    key_id = await _issue(client)
    r = await client.post("/api/v1/delete_api_key", json={"user_id": "alice", "api_key_id": key_id})
    assert (r.status_code, r.json()) == (200, {"message": "API key deleted successfully"})
    assert (await client.get("/api/v1/tables/api_key")).json() == {"data": []}


async def test_delete_used_key_disables_it_then_409(client: Client, deps: Deps) -> None:
    key_id = await _issue(client)
    await _write_usage(deps, {"api_key_id": key_id, "created": 1, "model": "llama", "total_tokens": 3})
    r = await client.post("/api/v1/delete_api_key", json={"user_id": "alice", "api_key_id": key_id})
    assert (r.status_code, r.json()) == (200, {"message": "API key disabled successfully"})
    [row] = (await client.get("/api/v1/tables/api_key")).json()["data"]
    assert row["enabled"] is False
    r = await client.post("/api/v1/delete_api_key", json={"user_id": "alice", "api_key_id": key_id})
    assert (r.status_code, r.json()) == (409, {"message": "API key already disabled"})


async def test_delete_key_of_another_user_is_404(client: Client) -> None:
    key_id = await _issue(client, "alice")
    r = await client.post("/api/v1/delete_api_key", json={"user_id": "mallory", "api_key_id": key_id})
    assert (r.status_code, r.json()) == (404, {"error": "API key not found for the given user_id and api_key_id"})
    r = await client.post("/api/v1/delete_api_key", json={"user_id": "alice", "api_key_id": 999})
    assert r.status_code == 404


async def test_tables_lists_the_toolkit_tables(client: Client) -> None:
    r = await client.get("/api/v1/tables")
    assert r.status_code == 200
    assert set(r.json()["tables"]) >= TOOLKIT_TABLES
    assert "replica_events" in r.json()["tables"]


async def test_table_rows_newest_first_limited_to_100(client: Client) -> None:
    for i in range(103):
        await create_model(client, f"m{i}")
    rows = (await client.get("/api/v1/tables/llm_models")).json()["data"]
    assert len(rows) == 100
    assert [r["name"] for r in rows[:2]] == ["m102", "m101"]
    assert rows[-1]["name"] == "m3"


async def test_metric_table_has_toolkit_columns_with_unix_created(client: Client, deps: Deps) -> None:
    key_id = await _issue(client)
    await _write_usage(
        deps,
        {
            "api_key_id": key_id,
            "input": "hi",
            "created": 1_700_000_000,
            "model": "llama",
            "choices": "[]",
            "prompt_tokens": 1,
            "completion_tokens": 2,
            "total_tokens": 3,
            "duration": 0.5,
        },
    )
    [row] = (await client.get("/api/v1/tables/metric")).json()["data"]
    assert {
        "id",
        "api_key_id",
        "input",
        "created",
        "model",
        "choices",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "duration",
    } <= set(row)
    assert row["created"] == 1_700_000_000
    assert isinstance(row["created"], int)


async def test_replica_rows_and_rules_are_browsable(client: Client) -> None:
    model_id = await create_model(client)
    await create_replica(client, model_id, create_vm=True, vm_creation_details=vm_details())
    [rule] = (await client.get("/api/v1/tables/replica_security_rules")).json()["data"]
    assert rule["port_range_min"] == 9400
    [event] = (await client.get("/api/v1/tables/replica_events")).json()["data"]
    assert event["to_status"] == "PENDING"


@pytest.mark.parametrize("name", ["nope", "alembic_version", "api_key;drop", "..x", "%00", "API_KEY", "a" * 300])
async def test_unknown_table_is_404(client: Client, name: str) -> None:
    r = await client.get(f"/api/v1/tables/{name}")
    assert (r.status_code, r.json()) == (404, {"error": "Detail not found"})


ADMIN_ROUTES = [
    ("POST", "/api/v1/generate_api_key"),
    ("POST", "/api/v1/delete_api_key"),
    ("GET", "/api/v1/tables"),
    ("GET", "/api/v1/tables/api_key"),
    ("GET", "/api/v1/models"),
    ("GET", "/api/v1/models/llama"),
    ("POST", "/api/v1/models"),
    ("DELETE", "/api/v1/models/1"),
    ("GET", "/api/v1/models/1/replicas"),
    ("POST", "/api/v1/models/1/replicas"),
    ("PUT", "/api/v1/models/replicas/1"),
    ("GET", "/api/v1/replicas/1"),
    ("DELETE", "/api/v1/replicas/1"),
]


BAD_AUTHORIZATIONS = [
    None,
    "",
    "Bearer",
    "Bearer ",
    "Bearer wrong",
    f"Basic {ADMIN_KEY}",
    f"Bearer {ADMIN_KEY}x",
    ADMIN_KEY,
]


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
async def test_admin_routes_refuse_anything_but_the_admin_key(
    anon_client: httpx.AsyncClient, method: str, path: str
) -> None:
    for authorization in BAD_AUTHORIZATIONS:
        headers = {} if authorization is None else {"Authorization": authorization}
        r = await anon_client.request(method, path, headers=headers, json={"name": "x"})
        assert (r.status_code, r.json()) == (401, {"error": "Invalid Admin API key."}), authorization


async def test_a_client_api_key_is_not_an_admin_key(client: Client, anon_client: httpx.AsyncClient) -> None:
    plain = (await client.post("/api/v1/generate_api_key", json={"user_id": "u"})).json()["api_key"]
    r = await anon_client.get("/api/v1/models", headers={"Authorization": f"Bearer {plain}"})
    assert r.status_code == 401


async def test_admin_key_is_accepted_in_any_bearer_case(anon_client: httpx.AsyncClient) -> None:
    r = await anon_client.get("/api/v1/models", headers={"Authorization": f"bearer {ADMIN_KEY}"})
    assert (r.status_code, r.json()) == (200, [])
