"""A priced model on an engine simulator and a connector key bound to it: what the billing tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from orchestrator.runtime.container import Deps
from tests.support.engines import Engine, engine_in_process
from tests.support.gateway import make_ready

MODEL = "priced"
PRICE_IN, PRICE_OUT = 1, 3  # dollars per million tokens
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    async with engine_in_process(MODEL, max_tokens=8) as e:
        yield e


async def priced_model(client: httpx.AsyncClient, deps: Deps, engine: Engine) -> int:
    r = await client.post(
        "/admin/model/save", json={"name": MODEL, "provider": "vllm", "price_in": PRICE_IN, "price_out": PRICE_OUT}
    )
    assert r.json()["success"], r.text
    await make_ready(client, deps, MODEL, engine.chat_url)
    return int(r.json()["data"]["id"])


async def connector_key(client: httpx.AsyncClient, model_id: int, **money: float) -> tuple[int, str]:
    r = await client.post("/admin/api-key/apply", json={"name": "payer", **money})
    data = r.json()["data"]
    bound = await client.post("/admin/api-key/bind-or-unbind-model", json={"key_id": data["id"], "model_id": model_id})
    assert bound.json() == {"success": True, "data": "created"}
    return int(data["id"]), str(data["api_key"])
