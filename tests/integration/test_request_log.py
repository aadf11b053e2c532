"""One log event per request with a request id; no key ever reaches a log line."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import structlog

from tests.support.settings import ADMIN_KEY, SECRET_KEY
from tests.support.toolkit import Client, create_model


@pytest.fixture(autouse=True)
def info_level() -> Iterator[None]:
    """As a server configures it: request events are INFO."""
    logger = logging.getLogger("api.request")
    before = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(before)


async def test_one_event_per_request_with_its_id(client: Client) -> None:
    with structlog.testing.capture_logs() as logs:
        r = await client.get("/api/v1/models", headers={"X-Request-ID": "req-123"})
    assert r.headers["x-request-id"] == "req-123"
    requests = [e for e in logs if e["event"] == "request"]
    assert len(requests) == 1
    assert requests[0]["path"] == "/api/v1/models"
    assert requests[0]["status"] == 200
    assert requests[0]["method"] == "GET"


async def test_unsafe_request_ids_are_replaced(client: Client) -> None:
    r = await client.get("/health", headers={"X-Request-ID": "bad id\twith spaces"})
    assert r.headers["x-request-id"] != "bad id\twith spaces"
    assert len(r.headers["x-request-id"]) == 32
    assert r.headers["x-request-id"] != (await client.get("/health")).headers["x-request-id"]


async def test_no_secret_in_any_log_event(client: Client) -> None:
    with structlog.testing.capture_logs() as logs:
        issued = (await client.post("/api/v1/generate_api_key", json={"user_id": "alice"})).json()
        model_id = await create_model(client)
        await client.post(f"/api/v1/models/{model_id}/replicas", json={"endpoint": "http://127.0.0.1:1/v1"})
        await client.get("/api/v1/models", headers={"Authorization": f"Bearer {issued['api_key']}"})
        await client.post("/api/v1/delete_api_key", json={"user_id": "alice", "api_key_id": issued["id"]})
    text = repr(logs)
    assert len(logs) >= 8
    for secret in (ADMIN_KEY, SECRET_KEY, issued["api_key"]):
        assert secret not in text
