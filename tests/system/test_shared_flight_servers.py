"""Two `orchestrator serve` processes on one PostgreSQL and one Redis (`ORCH_REDIS_URL`), the second with
`--no-scheduler`: an llm_endpoint's max_concurrency holds over both, and a replica deleted through the first (which
runs the jobs) stays DRAINING while the second has a stream on it, then drains."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.support.aio import run_in_thread
from tests.support.engines import Engine, engine_process
from tests.support.postgres import PostgresServer
from tests.support.redis import RedisServer
from tests.support.server import poll, serving

pytestmark = pytest.mark.postgres

ADMIN = "sk-shared-flight-admin-key-0123456789"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
MODEL = "flight"


@dataclass
class Deployment:
    first: str
    """With the jobs (it leads)."""
    second: str
    """`--no-scheduler`: it serves only."""
    key: str


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer, redis_server: RedisServer
) -> Iterator[Deployment]:
    env = {
        "ORCH_DATABASE_URL": run_in_thread(postgres.new_database),
        "ORCH_REDIS_URL": redis_server.url,
        "ORCH_DEPLOYMENT": RedisServer.new_namespace(),
        "ORCH_ADMIN_API_KEY": ADMIN,
        "ORCH_SECRET_KEY": "shared-flight-secret-key-0123456789",
        "ORCH_PROBE_STARTING_INTERVAL_S": "0.2",
        "ORCH_LOG_LEVEL": "WARNING",
    }
    state = tmp_path_factory.mktemp("shared-flight")
    with serving(state / "a", env=env) as (first, _), serving(state / "b", "--no-scheduler", env=env) as (second, _):
        key = _post(first, "/api/v1/generate_api_key", {"user_id": "u", "allowed_rpm": 10_000})["api_key"]
        yield Deployment(first, second, key)


def test_an_endpoints_max_concurrency_holds_over_both_servers(deployment: Deployment) -> None:
    with engine_process("upstream", "--ttft", "0.2", "--max-tokens", "2") as (engine, _):
        body = {"name": "Gated", "connector_type": "vllm", "uri": engine.chat_url, "token": "t"}
        body |= {"max_concurrency": 2, "max_calls_per_second": 0, "params": {"model": "upstream"}}
        _post(deployment.first, "/v1/llm_endpoints", body)
        for base in (deployment.first, deployment.second):  # the second hears of it through PostgreSQL
            poll(lambda b=base: _models(b, deployment.key), lambda models: "gated" in models)

        async def calls() -> list[int]:
            async with httpx.AsyncClient(headers=_bearer(deployment.key), timeout=60) as client:
                urls = [f"{(deployment.first, deployment.second)[i % 2]}/v1/chat/completions" for i in range(10)]
                answers = await asyncio.gather(*(client.post(u, json=_chat("gated")) for u in urls))
                return [r.status_code for r in answers]

        assert asyncio.run(calls()) == [200] * 10  # they wait at the gate, none is refused
        log = asyncio.run(engine.log())
    assert len(log["requests"]) == 10
    assert log["peak_running"] == 2  # five at once on each server, never more than two at the engine


def test_a_drain_waits_for_the_stream_on_the_other_server(deployment: Deployment) -> None:
    with engine_process(MODEL, "--tokens-per-s", "10") as (engine, _):
        model_id = _post(deployment.first, "/api/v1/models", {"name": MODEL})["id"]
        rid = _post(deployment.first, f"/api/v1/models/{model_id}/replicas", {"endpoint": engine.chat_url})[
            "replica_id"
        ]
        poll(lambda: _status(deployment.first, rid), lambda status: status == "READY")
        poll(lambda: _models(deployment.second, deployment.key), lambda models: MODEL in models)
        asyncio.run(_drain_under_a_stream(deployment, engine, rid))


async def _drain_under_a_stream(deployment: Deployment, engine: Engine, rid: int) -> None:
    async with httpx.AsyncClient(headers=_bearer(deployment.key), timeout=60) as client:
        request = client.build_request(
            "POST", f"{deployment.second}/v1/chat/completions", json=_chat(MODEL, max_tokens=30, stream=True)
        )
        stream = await client.send(request, stream=True)  # 30 tokens at 10 a second, on the second server
        try:
            assert stream.status_code == 200
            chunks = 0
            async for _ in stream.aiter_lines():  # the leader's reconcile job passes each second meanwhile
                chunks += 1
                if chunks == 4:  # a few tokens in: the second server has written its count (within 5 ms)
                    r = await client.delete(f"{deployment.first}/api/v1/replicas/{rid}", headers=ADMIN_HEADERS)
                    assert r.status_code == 204, r.text
                if chunks == 40:  # well into the stream, seconds after the deletion
                    assert await _status_async(client, deployment.first, rid) == "DRAINING"
            assert chunks > 40
        finally:
            await stream.aclose()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    async with httpx.AsyncClient() as client:
        while (status := await _status_async(client, deployment.first, rid)) not in {"TERMINATING", "TERMINATED"}:
            assert loop.time() < deadline, f"still {status}"
            await asyncio.sleep(0.1)
        events = (await client.get(f"{deployment.first}/api/v1/replicas/{rid}", headers=ADMIN_HEADERS)).json()["events"]
    [drained] = [e for e in events if e["from_status"] == "DRAINING"]
    assert drained["reason"] == "drained"


def _post(base: str, path: str, body: dict[str, Any]) -> Any:
    r = httpx.post(f"{base}{path}", json=body, headers=ADMIN_HEADERS)
    assert r.status_code in {200, 201}, r.text
    return r.json()


def _models(base: str, key: str) -> list[str]:
    return [m["id"] for m in httpx.get(f"{base}/v1/models", headers=_bearer(key)).json()["data"]]


def _status(base: str, rid: int) -> str:
    return str(httpx.get(f"{base}/api/v1/replicas/{rid}", headers=ADMIN_HEADERS).json()["status"])


async def _status_async(client: httpx.AsyncClient, base: str, rid: int) -> str:
    return str((await client.get(f"{base}/api/v1/replicas/{rid}", headers=ADMIN_HEADERS)).json()["status"])


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _chat(model: str, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
