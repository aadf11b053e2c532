"""Outbound calls hold under attack: no redirect is followed (gateway, LlmEndpoint, prober), admin URLs that point at
metadata, this server or its stores are refused with a 400 that says why, and a call looping through the gateway
is refused at once."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from orchestrator.domain.lifecycle import ReplicaStatus
from orchestrator.fleet.reconcile import reconcile
from orchestrator.platform.settings import Settings
from orchestrator.runtime.container import Deps
from tests.support.engines import Engine, app_in_process, engine_in_process
from tests.support.gateway import funded_key, issue_key, make_ready
from tests.support.settings import instance_settings

MODEL = "llama3.1"  # in LlmEndpoint's rate table
SECRET = "the-secret-document-0123456789"
REDIS_PORT = 6390
HOP = "x-orchestrator-hop"  # the wire name, as the README gives it
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    # A Redis is configured (none runs: only its address matters here).
    return instance_settings(tmp_path / "state", database_url).model_copy(
        update={"redis_url": f"redis://127.0.0.1:{REDIS_PORT}/0"}
    )


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    async with engine_in_process(MODEL, max_tokens=4) as e:
        yield e


@asynccontextmanager
async def listening(handle: Handler) -> AsyncIterator[str]:
    """A small real HTTP server on a free local port; yields its origin."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    async with app_in_process(app) as origin:
        yield origin


async def relayed(client: httpx.AsyncClient, request: web.Request) -> web.Response:
    """`request` sent on as it came (method, path, headers, body) with `client`; its answer as it came back."""
    headers = {k: v for k, v in request.headers.items() if k.lower() not in {"host", "content-length"}}
    r = await client.request(request.method, request.path_qs, headers=headers, content=await request.read())
    return web.Response(
        status=r.status_code, body=r.content, headers={"Content-Type": r.headers.get("content-type", "text/plain")}
    )


@asynccontextmanager
async def secret_server() -> AsyncIterator[str]:
    """What a redirect must never reach: it answers any request with a 200 holding the secret."""

    async def handle(_: web.Request) -> web.Response:
        message = {"role": "assistant", "content": SECRET}
        return web.json_response({"id": "x", "object": "chat.completion", "choices": [{"message": message}]})

    async with listening(handle) as url:
        yield url


@asynccontextmanager
async def redirecting(to: str, engine: Engine | None = None) -> AsyncIterator[str]:
    """An engine that answers its chat completions with a 307 to `to`; everything else is `engine`'s answer (or a
    307 to `to` too, without one)."""
    async with httpx.AsyncClient(base_url=engine.url if engine else to) as forward:

        async def handle(request: web.Request) -> web.StreamResponse:
            if engine is None or request.path.endswith("/chat/completions"):
                raise web.HTTPTemporaryRedirect(to + request.path_qs)
            return await relayed(forward, request)

        async with listening(handle) as url:
            yield url


# -- no redirect is followed -------------------------------------------------------------------------------------


async def test_a_redirecting_replica_is_a_502_never_the_other_body(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, engine: Engine
) -> None:
    async with secret_server() as secret, redirecting(secret, engine) as replica:
        [replica_id] = await make_ready(client, deps, MODEL, f"{replica}/v1/chat/completions")
        _, key = await funded_key(client, "1")
        auth = {"Authorization": f"Bearer {key}"}
        r = await anon_client.post("/v1/chat/completions", json=CHAT, headers=auth)
        assert r.status_code == 502, r.text
        assert r.json()["error"]["type"] == "upstream_unreachable"  # the OpenAI envelope, as for a dead replica
        assert "redirect" in r.json()["error"]["message"]
        assert SECRET not in r.text
        r = await anon_client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth)
        assert r.status_code == 502, r.text
        assert SECRET not in r.text
        r = await anon_client.post("/api/v1/chat/completions", json=CHAT, headers=auth)  # the toolkit's surface
        assert r.json() == {"error": "No Replica available / ready."}, r.text
        r = await anon_client.post("/api/v1/completions", json=CHAT, headers={"Authorization": key})  # LlmEndpoint's
        assert r.status_code == 400, r.text
        assert r.json()["message"] == "Max attempts reached - no available hosts"
        assert SECRET not in r.text
    replica_row = await deps.store.replica(replica_id)
    assert replica_row is not None
    assert replica_row.status == ReplicaStatus.READY  # the engine answered: no passive ejection for a redirect


async def test_a_redirecting_llm_endpoint_is_a_502_never_the_other_body(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient
) -> None:
    async with secret_server() as secret, redirecting(secret) as endpoint:
        body = {
            "name": "Redirecting",
            "connector_type": "openai-compatible",
            "uri": f"{endpoint}/v1/chat/completions",
            "token": "",
            "max_calls_per_second": 0,
            "max_concurrency": 0,
            "params": {},
        }
        r = await client.post("/v1/llm_endpoints", json=body)
        assert r.status_code == 200, r.text
        _, key = await issue_key(client)
        r = await anon_client.post(
            "/v1/chat/completions", json={**CHAT, "model": "redirecting"}, headers={"Authorization": f"Bearer {key}"}
        )
        assert r.status_code == 502, r.text
        assert SECRET not in r.text


async def test_the_prober_does_not_follow_a_redirect_to_a_healthy_engine(
    client: httpx.AsyncClient, deps: Deps, engine: Engine
) -> None:
    async with redirecting(engine.url) as replica:  # every path: a 307 to the same path on a healthy engine
        model_id = (await client.post("/api/v1/models", json={"name": MODEL})).json()["id"]
        r = await client.post(f"/api/v1/models/{model_id}/replicas", json={"endpoint": f"{replica}/v1"})
        assert r.status_code == 201, r.text
        replica_id = r.json()["replica_id"]
        await reconcile(deps.store)
        for _ in range(5):
            await deps.health.run()
        replica_row = await deps.store.replica(replica_id)
        assert replica_row is not None
        assert replica_row.status == ReplicaStatus.STARTING, replica_row
        assert (await engine.log())["requests"] == []  # not even the probe's 1-token completion got there


# -- admin URLs ----------------------------------------------------------------------------------------------------

REFUSED = [
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
    ("http://0xa9fea9fe/v1", "169.254.169.254 is a link-local address"),
    ("http://2852039166/v1", "169.254.169.254 is a link-local address"),
    ("http://0251.0376.0251.0376/v1", "169.254.169.254 is a link-local address"),
    ("http://[::ffff:169.254.169.254]/v1", "is a link-local address"),
    ("http://[fe80::1]:8000/v1", "fe80::1 is a link-local address"),
    ("http://0.0.0.0:9000/v1", "0.0.0.0 is an unspecified address"),
    ("http://[::]:9000/v1", ":: is an unspecified address"),
    ("http://224.0.0.1/v1", "224.0.0.1 is a multicast address"),
    ("http://240.0.0.1/v1", "240.0.0.1 is a reserved address"),
    ("http://127.0.0.1:8000/v1", "127.0.0.1 is this orchestrator (at 127.0.0.1:8000)"),  # settings.host/port
    ("http://localhost:8000/v1", "localhost resolves to 127.0.0.1, which is this orchestrator"),
    (f"http://127.0.0.1:{REDIS_PORT}/v1", "127.0.0.1 is the orchestrator's Redis"),
    ("http://nowhere.invalid/v1", "must name a host that resolves: nowhere.invalid does not resolve"),
]


@pytest.mark.parametrize(("url", "why"), REFUSED, ids=[u for u, _ in REFUSED])
async def test_toolkit_refuses_a_replica_endpoint_that_points_where_it_must_not(
    client: httpx.AsyncClient, url: str, why: str
) -> None:
    model_id = (await client.post("/api/v1/models", json={"name": MODEL})).json()["id"]
    r = await client.post(f"/api/v1/models/{model_id}/replicas", json={"endpoint": url})
    assert r.status_code == 400, r.text
    [message] = r.json()["errors"]["endpoint"]
    assert message.startswith("endpoint must "), message
    assert why in message
    assert (await client.get(f"/api/v1/models/{model_id}/replicas")).json() == []


@pytest.mark.parametrize(("url", "why"), REFUSED, ids=[u for u, _ in REFUSED])
async def test_moonshot_refuses_an_endpoint_uri_that_points_where_it_must_not(
    client: httpx.AsyncClient, url: str, why: str
) -> None:
    body = {"name": "ep", "connector_type": "openai-compatible", "uri": url, "token": "", "params": {}}
    r = await client.post("/v1/llm_endpoints", json={**body, "max_calls_per_second": 0, "max_concurrency": 0})
    assert r.status_code == 422, r.text
    [message] = r.json()["error"]
    assert message.startswith("uri must "), message
    assert why in message
    assert (await client.get("/v1/llm_endpoints")).json() == []


# -- loops -------------------------------------------------------------------------------------------------------


async def test_a_call_looping_through_the_gateway_is_refused_with_508(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, transport: httpx.ASGITransport
) -> None:
    """An llm_endpoint behind a proxy that leads back to this gateway (no URL check can see that), with a client
    key as its token: each call would call the gateway again."""
    arrivals = 0

    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as gateway:

        async def proxy(request: web.Request) -> web.Response:
            nonlocal arrivals
            arrivals += 1
            if arrivals > 5:  # bounds the loop when nothing else does
                return web.json_response({"error": "the proxy stopped the loop"}, status=500)
            return await relayed(gateway, request)

        async with listening(proxy) as url:
            _, key = await issue_key(client, rpm=1000)
            body = {
                "name": "Loop",
                "connector_type": "openai-compatible",
                "uri": f"{url}/v1/chat/completions",
                "token": key,
                "max_calls_per_second": 0,
                "max_concurrency": 0,
                "params": {"model": "loop"},  # the endpoint's own id: the call comes back for itself
            }
            assert (await client.post("/v1/llm_endpoints", json=body)).status_code == 200
            r = await anon_client.post(
                "/v1/chat/completions", json={**CHAT, "model": "loop"}, headers={"Authorization": f"Bearer {key}"}
            )
    assert arrivals == 1
    assert r.status_code == 508, r.text
    assert r.json()["error"]["type"] == "loop_detected"


async def test_a_request_naming_this_instance_is_refused_before_any_route(
    anon_client: httpx.AsyncClient, deps: Deps
) -> None:
    own = deps.upstream.hops.instance
    for path in ("/v1/models", "/api/v1/completions", "/health", "/api/v1/models"):
        r = await anon_client.get(path, headers={HOP: f"0123456789abcdef,{own}"})
        assert r.status_code == 508, path
        assert r.json()["error"]["code"] == "508"
    # Another instance's id is no loop: the request goes on (here, to its 401 for want of a key).
    r = await anon_client.get("/v1/models", headers={HOP: "0123456789abcdef"})
    assert r.status_code == 401
