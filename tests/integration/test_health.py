"""Health probing against real engine simulators: to READY (also on a chat-only endpoint), out to UNHEALTHY and
back, never-ready, failover; a failing probe's error on the replica and in the log."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta

import httpx
import openai
import pytest
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from api.app import create_app
from orchestrator.domain.lifecycle import ReplicaStatus
from orchestrator.enginesim.server import SimConfig, build_app
from orchestrator.fleet.reconcile import reconcile
from orchestrator.platform.settings import Settings
from orchestrator.runtime.compose import Runtime, build_deps
from orchestrator.runtime.container import Deps
from tests.support.engines import Engine, app_in_process, engine_in_process, engine_process, free_port
from tests.support.gateway import issue_key, make_ready, openai_client
from tests.support.settings import ADMIN_KEY

S = ReplicaStatus
MODEL = "qwen"


async def _status(deps: Deps, replica_id: int) -> str:
    replica = await deps.store.replica(replica_id)
    assert replica is not None
    return replica.status


async def test_full_url_and_base_url_both_reach_ready(client: httpx.AsyncClient, deps: Deps) -> None:
    async with engine_in_process(MODEL) as a, engine_in_process(MODEL) as b:
        await make_ready(client, deps, MODEL, a.chat_url, f"{b.url}/v1/")
        assert len(deps.catalog.pools[MODEL]) == 2


async def test_replica_that_stops_answering_leaves_the_pool_and_comes_back(
    client: httpx.AsyncClient, transport: httpx.ASGITransport, deps: Deps
) -> None:
    async with engine_in_process(MODEL) as engine:
        [replica_id] = await make_ready(client, deps, MODEL, engine.chat_url)
        _, key = await issue_key(client)
        sdk = openai_client(transport, key)

        await engine.set_faults(dead=True)
        for _ in range(deps.settings.unhealthy_after - 1):
            await deps.health.run()
            assert await _status(deps, replica_id) == S.READY
        await deps.health.run()
        assert await _status(deps, replica_id) == S.UNHEALTHY
        assert deps.catalog.pools.get(MODEL, []) == []
        with pytest.raises(openai.InternalServerError) as refused:  # not routed to an UNHEALTHY replica
            await sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert refused.value.status_code == 503

        await engine.set_faults(dead=False)
        for _ in range(deps.settings.healthy_after):
            await deps.health.run()
        assert await _status(deps, replica_id) == S.READY
        answer = await sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert answer.choices
        detail = (await client.get(f"/api/v1/replicas/{replica_id}")).json()
        assert [e["to_status"] for e in detail["events"]][-3:] == ["READY", "UNHEALTHY", "READY"]


async def test_wrong_model_on_the_engine_never_becomes_ready(client: httpx.AsyncClient, deps: Deps) -> None:
    async with engine_in_process("something-else") as engine:
        model_id = (await client.post("/api/v1/models", json={"name": MODEL})).json()["id"]
        r = await client.post(f"/api/v1/models/{model_id}/replicas", json={"endpoint": engine.chat_url})
        replica_id = r.json()["replica_id"]
        await reconcile(deps.store)
        await deps.health.run()
        assert await _status(deps, replica_id) == S.STARTING


async def test_never_ready_replica_is_terminated_with_a_reason(client: httpx.AsyncClient, deps: Deps) -> None:
    deps.health.policy = dataclasses.replace(deps.health.policy, startup_grace_s=0.0)
    model_id = (await client.post("/api/v1/models", json={"name": MODEL})).json()["id"]
    closed = f"http://127.0.0.1:{free_port()}/v1"
    replica_id = (await client.post(f"/api/v1/models/{model_id}/replicas", json={"endpoint": closed})).json()[
        "replica_id"
    ]
    await reconcile(deps.store)
    await deps.health.run()
    await reconcile(deps.store)
    [replica] = (await client.get(f"/api/v1/models/{model_id}/replicas")).json()
    assert (replica["status"], replica["vm_status"]) == ("TERMINATED", "FAILED")
    assert replica["error_message"]
    detail = (await client.get(f"/api/v1/replicas/{replica_id}")).json()
    assert detail["termination_reason"] == "never_ready"


async def test_killing_an_engine_under_load_loses_no_request(
    client: httpx.AsyncClient, transport: httpx.ASGITransport, deps: Deps
) -> None:
    # Real processes: one is killed with SIGKILL in the middle of the load.
    with engine_process(MODEL, "--ttft", "0.01") as (a, proc_a), engine_process(MODEL, "--ttft", "0.01") as (b, _):
        killed, _survivor = await make_ready(client, deps, MODEL, a.chat_url, b.chat_url)
        _, key = await issue_key(client, rpm=100_000)
        sdk = openai_client(transport, key)
        done = 0

        async def one() -> None:
            nonlocal done
            answer = await sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
            assert answer.choices
            done += 1
            if done == 40:
                proc_a.kill()

        async def worker(n: int) -> None:
            for _ in range(n):
                await one()

        results = await asyncio.gather(*(worker(15) for _ in range(8)), return_exceptions=True)
        assert [r for r in results if r is not None] == []
        assert done == 120
        # The refused connections counted as failed probes; probes confirm and take it out of the pool.
        for _ in range(deps.settings.unhealthy_after):
            await deps.health.run()
        assert await _status(deps, killed) == S.UNHEALTHY


# -- readiness on a chat-only endpoint, and the probe's failure where an admin looks --------------------------


@asynccontextmanager
async def sim_behind(model: str, middleware: Middleware, **knobs: object) -> AsyncIterator[Engine]:
    """The simulator with `middleware` in front of its routes: an engine that answers some paths its own way."""
    app = build_app(SimConfig(model=model, port=0, **knobs))  # type: ignore[arg-type]
    app.middlewares.append(middleware)
    async with app_in_process(app) as url:
        yield Engine(url, model)


@asynccontextmanager
async def chat_only_engine(model: str, **knobs: object) -> AsyncIterator[tuple[Engine, list[str]]]:
    """The simulator less `/v1/completions` (404, as a chat-only API answers there); yields it and the paths of the
    completion requests it refused."""
    refused: list[str] = []

    @web.middleware
    async def no_completions(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/v1/completions":
            refused.append(request.path)
            raise web.HTTPNotFound(
                text='{"error": {"message": "This is a chat model."}}', content_type="application/json"
            )
        return await handler(request)

    async with sim_behind(model, no_completions, **knobs) as engine:
        yield engine, refused


async def test_chat_only_endpoint_becomes_ready_on_a_one_token_chat(client: httpx.AsyncClient, deps: Deps) -> None:
    async with chat_only_engine(MODEL, api_key="engine-secret") as (engine, refused):
        [replica_id] = await make_ready(client, deps, MODEL, engine.chat_url, engine_api_key="engine-secret")
        assert [c["body"]["max_tokens"] for c in await engine.chats()] == [1]
        # What works is remembered: coming back from UNHEALTHY costs no second completion.
        await engine.set_faults(dead=True)
        for _ in range(deps.settings.unhealthy_after):
            await deps.health.run()
        await engine.set_faults(dead=False)
        for _ in range(deps.settings.healthy_after):
            await deps.health.run()
        assert await _status(deps, replica_id) == S.READY
        assert refused == ["/v1/completions"]


@pytest.fixture
async def scheduled(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, Deps]]:
    """An instance whose jobs run on their own, at the default probe intervals."""
    defaults = Settings.model_fields
    deps = build_deps(
        settings.model_copy(
            update={
                "scheduler": True,
                "probe_starting_interval_s": defaults["probe_starting_interval_s"].default,
                "probe_ready_interval_s": defaults["probe_ready_interval_s"].default,
            }
        )
    )
    runtime = Runtime(deps)
    await runtime.start()
    try:
        transport = httpx.ASGITransport(app=create_app(runtime))
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=headers) as c:
            yield c, deps
    finally:
        await runtime.stop()
        await deps.engine.dispose()


WRONG_KEY = "wrong-engine-key-0123456789"


@pytest.mark.parametrize(
    ("served", "endpoint_path", "engine_key", "expected"),
    [
        (MODEL, "/v1/chat/completions", WRONG_KEY, "GET /v1/models answered 401"),
        ("something-else", "/v1/chat/completions", "engine-secret", "does not list 'qwen'"),
        (MODEL, "/nope/v1/chat/completions", "engine-secret", "GET /nope/v1/models answered 404"),
    ],
    ids=["wrong-key", "wrong-model", "wrong-path"],
)
async def test_a_misconfigured_replica_shows_its_probe_error_within_seconds(
    scheduled: tuple[httpx.AsyncClient, Deps], served: str, endpoint_path: str, engine_key: str, expected: str
) -> None:
    client, deps = scheduled
    async with engine_in_process(served, api_key="engine-secret") as engine:
        model_id = (await client.post("/api/v1/models", json={"name": MODEL})).json()["id"]
        with structlog.testing.capture_logs() as logs:
            r = await client.post(
                f"/api/v1/models/{model_id}/replicas",
                json={"endpoint": engine.url + endpoint_path, "engine_api_key": engine_key},
            )
            replica_id = r.json()["replica_id"]
            deadline = time.monotonic() + 5
            while (detail := (await client.get(f"/api/v1/replicas/{replica_id}")).json())["probe_error"] is None:
                assert time.monotonic() < deadline, detail
                await asyncio.sleep(0.05)
            # Read while the engine still answers as it did (the scheduler goes on probing).
            [listed] = (await client.get(f"/api/v1/models/{model_id}/replicas")).json()

    assert expected in detail["probe_error"]
    assert detail["status"] == "STARTING"
    changed = datetime.fromisoformat(detail["status_changed_at"])
    assert datetime.fromisoformat(detail["probe_error_since"]) >= changed
    grace = timedelta(seconds=deps.settings.startup_grace_s)
    assert datetime.fromisoformat(detail["ready_deadline"]) == changed + grace
    assert listed["error_message"] == f"not ready: {detail['probe_error']}"
    [event] = [e for e in logs if e["event"] == "replica.probe_failed"]
    assert (event["replica_id"], event["error"]) == (replica_id, detail["probe_error"])
    assert WRONG_KEY not in repr(logs) + repr(detail) + repr(listed)


async def test_the_probe_error_is_logged_once_per_change_and_cleared_at_ready(
    client: httpx.AsyncClient, deps: Deps
) -> None:
    async with engine_in_process(MODEL) as engine:
        model_id = (await client.post("/api/v1/models", json={"name": MODEL})).json()["id"]
        r = await client.post(f"/api/v1/models/{model_id}/replicas", json={"endpoint": engine.chat_url})
        replica_id = r.json()["replica_id"]
        await reconcile(deps.store)
        await engine.set_faults(dead=True)
        with structlog.testing.capture_logs() as logs:
            for _ in range(3):
                await deps.health.run()
            first = (await client.get(f"/api/v1/replicas/{replica_id}")).json()
            await engine.set_faults(fail_rate=1.0, dead=False)  # /health passes now, the completion does not
            await deps.health.run()
            second = (await client.get(f"/api/v1/replicas/{replica_id}")).json()
            await engine.set_faults(fail_rate=0.0)
            await deps.health.run()

        assert first["probe_error"] == "GET /health answered 503"
        assert second["probe_error"].startswith("POST /v1/completions answered 500")
        assert second["probe_error_since"] > first["probe_error_since"]
        assert [e["error"] for e in logs if e["event"] == "replica.probe_failed"] == [
            first["probe_error"],
            second["probe_error"],
        ]
        ready = (await client.get(f"/api/v1/replicas/{replica_id}")).json()
        assert ready["status"] == "READY"
        assert (ready["probe_error"], ready["probe_error_since"], ready["ready_deadline"]) == (None, None, None)
        [listed] = (await client.get(f"/api/v1/models/{model_id}/replicas")).json()
        assert listed["error_message"] is None


async def test_an_engine_that_echoes_the_key_in_its_error_does_not_show_it(
    client: httpx.AsyncClient, deps: Deps
) -> None:
    @web.middleware
    async def echo_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/v1/models":
            given = request.headers.get("Authorization", "")
            raise web.HTTPUnauthorized(text=f"Incorrect API key provided: {given}. " + "x" * 300)
        return await handler(request)

    async with sim_behind(MODEL, echo_key) as engine:
        model_id = (await client.post("/api/v1/models", json={"name": MODEL})).json()["id"]
        r = await client.post(
            f"/api/v1/models/{model_id}/replicas", json={"endpoint": engine.chat_url, "engine_api_key": WRONG_KEY}
        )
        replica_id = r.json()["replica_id"]
        await reconcile(deps.store)
        with structlog.testing.capture_logs() as logs:
            await deps.health.run()
        detail = (await client.get(f"/api/v1/replicas/{replica_id}")).json()

    assert detail["probe_error"].startswith("GET /v1/models answered 401: Incorrect API key provided: Bearer ***. xxx")
    assert WRONG_KEY[:8] not in repr(logs) + repr(detail)
