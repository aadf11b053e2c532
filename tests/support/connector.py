"""Calls on the Bedrock connector's admin API and checks of its envelope, shared by its tests."""

from __future__ import annotations

from typing import Any, Literal

import httpx

Client = httpx.AsyncClient
Json = dict[str, Any]
Param = str | int

BAD_KEY = "Unauthorized: api key error"


def bearer(key: str | None) -> dict[str, str]:
    """Headers naming `key`; none at all for None (the client's own, if it has any)."""
    return {} if key is None else {"Authorization": f"Bearer {key}"}


async def get(c: Client, path: str, key: str | None = None, /, **params: Param) -> httpx.Response:
    return await c.get(path, params=params, headers=bearer(key))


async def post(c: Client, path: str, body: object, key: str | None = None) -> httpx.Response:
    return await c.post(path, json=body, headers=bearer(key))


def data(r: httpx.Response) -> Any:
    """The `data` of a success envelope (HTTP 200)."""
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"success", "data"}, body
    assert body["success"] is True, body
    return body["data"]


def failed(r: httpx.Response, status: int, message: str) -> None:
    assert (r.status_code, r.json()) == (status, {"success": False, "data": message}), r.text


def rejected(r: httpx.Response, context: object = None) -> str:
    """The message of a 400 failure envelope."""
    assert r.status_code == 400, (context, r.text)
    body = r.json()
    assert set(body) == {"success", "data"}, (context, body)
    assert body["success"] is False, (context, body)
    assert isinstance(body["data"], str), (context, body)
    assert body["data"], context
    return body["data"]


async def listing(c: Client, path: str, key: str | None = None, /, **params: Param) -> Json:
    """A page `{items, total, limit, offset}`."""
    page: Json = data(await get(c, path, key, **params))
    assert set(page) == {"items", "total", "limit", "offset"}, page
    return page


def names(page: Json, field: str = "name") -> list[Any]:
    return [item[field] for item in page["items"]]


async def apply_key(c: Client, name: str, **fields: object) -> Json:
    key: Json = data(await post(c, "/admin/api-key/apply", {"name": name, **fields}))
    return key


async def save_model(c: Client, name: str, provider: str = "vllm", **fields: object) -> Json:
    model: Json = data(await post(c, "/admin/model/save", {"name": name, "provider": provider, **fields}))
    return model


async def save_group(c: Client, name: str, **fields: object) -> Json:
    group: Json = data(await post(c, "/admin/group/save", {"name": name, **fields}))
    return group


Owner = Literal["api-key", "group"]


async def toggle(c: Client, owner: Owner, owner_id: int, model_id: int) -> str:
    field = "key_id" if owner == "api-key" else "group_id"
    body = {field: owner_id, "model_id": model_id}
    outcome: str = data(await post(c, f"/admin/{owner}/bind-or-unbind-model", body))
    return outcome


async def bindings(c: Client, owner: Owner, owner_id: int) -> list[tuple[int, str]]:
    """(model_id, model_name) bound to a key or a group, checking each row names its owner."""
    field = "key" if owner == "api-key" else "group"
    page = await listing(c, f"/admin/{owner}/list-model", **{f"{field}_id": owner_id})
    assert all(b[f"{field}_id"] == owner_id for b in page["items"]), page
    return [(b["model_id"], b["model_name"]) for b in page["items"]]


async def mine(c: Client, key: str) -> httpx.Response:
    return await get(c, "/user/api-key/mine", key)
