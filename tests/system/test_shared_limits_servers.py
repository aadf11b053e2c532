"""Two `orchestrator serve` processes on one PostgreSQL and one Redis, as a deployment behind a load balancer runs
them: a key's requests per minute, and a metered key's spend holds, are counted over both (`ORCH_REDIS_URL`)."""

from __future__ import annotations

import asyncio
from collections import Counter
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

ADMIN = "sk-shared-limits-admin-key-0123456789"
SECRET = "shared-limits-secret-key-0123456789"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
MODEL = "shared"
RPM = 50
WORST_USD = 0.001
"""What a call of 100 completion tokens holds at $10 per million (prompts cost nothing here)."""


@dataclass
class Deployment:
    bases: tuple[str, str]
    """The first instance (with the jobs), and the second (`--no-scheduler`)."""
    engine: Engine
    limited_key: str
    """A toolkit key with an `allowed_rpm` of 50."""
    metered_key: str
    """A connector key whose balance fits four and a half calls of 100 tokens."""


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer, redis_server: RedisServer
) -> Iterator[Deployment]:
    """Both instances on the same database, Redis, deployment name and keys. The first registers the model with an
    engine simulator as its READY replica and makes the keys; the second starts after and reads them at its start."""
    env = {
        "ORCH_DATABASE_URL": run_in_thread(postgres.new_database),
        "ORCH_REDIS_URL": redis_server.url,
        "ORCH_DEPLOYMENT": RedisServer.new_namespace(),
        "ORCH_ADMIN_API_KEY": ADMIN,
        "ORCH_SECRET_KEY": SECRET,
        "ORCH_PROBE_STARTING_INTERVAL_S": "0.2",
        "ORCH_LOG_LEVEL": "WARNING",
    }
    state = tmp_path_factory.mktemp("shared-limits")
    with engine_process(MODEL) as (engine, _), serving(state / "a", env=env) as (first, _):
        model = {"name": MODEL, "provider": "vllm", "price_in": 0, "price_out": 10}
        model_id = _post(first, "/admin/model/save", model)["data"]["id"]
        replica = _post(first, f"/api/v1/models/{model_id}/replicas", {"endpoint": engine.chat_url})["replica_id"]
        poll(lambda: httpx.get(f"{first}/api/v1/replicas/{replica}", headers=ADMIN_HEADERS).json()["status"], _ready)
        limited = _post(first, "/api/v1/generate_api_key", {"user_id": "u", "allowed_rpm": RPM})["api_key"]
        payer = {"name": "payer", "month_quota": 0, "balance": 4.5 * WORST_USD}
        metered = _post(first, "/admin/api-key/apply", payer)["data"]
        assert _post(first, "/admin/api-key/bind-or-unbind-model", {"key_id": metered["id"], "model_id": model_id})[
            "success"
        ]
        with serving(state / "b", "--no-scheduler", env=env) as (second, _):
            yield Deployment((first, second), engine, limited, metered["api_key"])


def test_a_keys_requests_per_minute_hold_over_both_instances(deployment: Deployment) -> None:
    first, second = deployment.bases

    async def burst() -> Counter[tuple[str, int]]:
        limits = httpx.Limits(max_connections=400)
        async with httpx.AsyncClient(headers=_bearer(deployment.limited_key), timeout=60, limits=limits) as client:
            bases = [(first, second)[i % 2] for i in range(200)]
            answers = await asyncio.gather(*(client.post(f"{b}/v1/chat/completions", json=_chat(1)) for b in bases))
            return Counter((base, r.status_code) for base, r in zip(bases, answers, strict=True))

    answered = asyncio.run(burst())
    assert sum(n for (_, status), n in answered.items() if status == 200) == RPM
    assert sum(n for (_, status), n in answered.items() if status == 429) == 200 - RPM
    # Each instance took its hundred calls (alone, each would have answered fifty of them): which one answered the
    # fifty depends on which calls reached Redis first (once, in CI, all fifty were the first instance's).
    assert answered[first, 200] + answered[first, 429] == answered[second, 200] + answered[second, 429] == 100


def test_a_metered_keys_holds_hold_over_both_instances(deployment: Deployment) -> None:
    asyncio.run(_calls_in_flight(deployment))
    # Each instance's holds were given back when its calls ended: the balance is there for a call on either.
    for base in deployment.bases:
        answer = poll(
            lambda b=base: httpx.post(
                f"{b}/v1/chat/completions", json=_chat(100), headers=_bearer(deployment.metered_key)
            ),
            _not_refused,
        )
        assert answer.status_code == 200, answer.text


async def _calls_in_flight(deployment: Deployment) -> None:
    """12 streams of the key over both instances at once, while each takes 99 s: 4 fit in its balance and 8 are
    refused; then the four are closed by their clients."""
    await deployment.engine.set_faults(tokens_per_s=1)
    try:
        async with httpx.AsyncClient(headers=_bearer(deployment.metered_key), timeout=60) as client:
            body = _chat(100) | {"stream": True}
            urls = [f"{deployment.bases[i % 2]}/v1/chat/completions" for i in range(12)]
            answers = await asyncio.gather(
                *(client.send(client.build_request("POST", u, json=body), stream=True) for u in urls)
            )
            try:
                assert Counter(r.status_code for r in answers) == {200: 4, 402: 8}
            finally:
                for answer in answers:
                    await answer.aclose()  # the clients leave: the calls end and give their holds back
    finally:
        await deployment.engine.set_faults(tokens_per_s=0)


def _post(base: str, path: str, body: dict[str, Any]) -> Any:
    r = httpx.post(f"{base}{path}", json=body, headers=ADMIN_HEADERS)
    assert r.is_success, r.text
    return r.json()


def _ready(status: str) -> bool:
    return status == "READY"


def _chat(max_tokens: int) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _not_refused(r: httpx.Response) -> bool:
    """A call refused for spend while the last streams' holds are given back is tried again."""
    return r.status_code != 402
