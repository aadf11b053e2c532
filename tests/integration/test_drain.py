"""DRAINING waits for the gateway's calls on the replica: new calls go elsewhere at once, calls in flight finish (or
the drain timeout passes), and the event timeline says which. Real streams through the app to engine simulators on
real sockets; the reconcile job called as the scheduler calls it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from orchestrator.domain.lifecycle import ReplicaStatus
from orchestrator.fleet.drain import Drain
from orchestrator.fleet.reconcile import reconcile
from orchestrator.platform.settings import Settings
from orchestrator.runtime.container import Deps
from tests.support.engines import Engine, engine_in_process
from tests.support.gateway import issue_key, make_ready
from tests.support.settings import instance_settings

S = ReplicaStatus
MODEL = "drain-model"
TIMEOUT_S = 1.0
"""The drain timeout of these tests: far longer than a reconcile pass, far shorter than a hung call."""
STREAM = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "stream": True}


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return instance_settings(tmp_path / "state", database_url).model_copy(update={"drain_timeout_s": TIMEOUT_S})


@pytest.fixture
async def slow() -> AsyncIterator[Engine]:
    """16 tokens at 20 a second: a stream lasts about 0.8 s."""
    async with engine_in_process(MODEL, tokens_per_s=20) as e:
        yield e


@pytest.fixture
async def other() -> AsyncIterator[Engine]:
    async with engine_in_process(MODEL) as e:
        yield e


async def reconcile_job(deps: Deps) -> bool:
    """The reconcile job's pass, with what the scheduler passes."""
    return await reconcile(deps.store, None, Drain(deps.catalog, deps.settings.drain_timeout_s))


async def status(deps: Deps, replica_id: int) -> str:
    replica = await deps.store.replica(replica_id)
    assert replica is not None
    return replica.status


async def ending(deps: Deps, replica_id: int) -> tuple[str, str | None]:
    """The reason and message of the replica's move out of DRAINING."""
    detail = await deps.replicas.detail(replica_id)
    [event] = [e for e in detail.events if e.from_status == S.DRAINING]
    return event.reason, event.message


async def until_running(engine: Engine, n: int) -> None:
    """Until the engine is answering `n` chats (received, not finished)."""
    async with asyncio.timeout(10):
        while len([c for c in await engine.chats() if c["finished"] is None]) < n:  # noqa: ASYNC110 (read over HTTP)
            await asyncio.sleep(0.01)


async def test_deleting_a_replica_lets_its_streams_finish_and_sends_new_calls_elsewhere(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, slow: Engine, other: Engine
) -> None:
    [leaving] = await make_ready(client, deps, MODEL, slow.chat_url)
    _, key = await issue_key(client)
    auth = {"Authorization": f"Bearer {key}"}
    streams = [
        asyncio.create_task(anon_client.post("/v1/chat/completions", json=STREAM, headers=auth)) for _ in range(3)
    ]
    await until_running(slow, 3)
    [staying] = await make_ready(client, deps, MODEL, other.chat_url)

    assert (await client.delete(f"/api/v1/replicas/{leaving}")).status_code == 204
    deps.nudge.take()
    assert not await reconcile_job(deps)
    assert await status(deps, leaving) == S.DRAINING  # held while its streams run
    for _ in range(4):  # new calls: all on the other replica
        r = await anon_client.post("/v1/chat/completions", json={**STREAM, "stream": False}, headers=auth)
        assert r.status_code == 200, r.text
    assert len(await other.chats()) == 4
    assert len(await slow.chats()) == 3

    for answer in await asyncio.gather(*streams):
        assert answer.status_code == 200
        assert answer.text.rstrip().endswith("data: [DONE]"), answer.text[-200:]  # whole, not cut
    assert deps.nudge.take()  # the last call's end asked the reconcile job to run
    assert await reconcile_job(deps)
    assert await status(deps, leaving) == S.TERMINATED
    reason, message = await ending(deps, leaving)
    assert reason == "drained"
    assert message is not None
    assert message.startswith("drained: 3 in-flight calls finished in "), message
    assert await status(deps, staying) == S.READY


async def test_a_replica_with_nothing_in_flight_drains_at_once(
    client: httpx.AsyncClient, deps: Deps, other: Engine
) -> None:
    [replica_id] = await make_ready(client, deps, MODEL, other.chat_url)
    assert (await client.delete(f"/api/v1/replicas/{replica_id}")).status_code == 204
    assert await reconcile_job(deps)
    assert await status(deps, replica_id) == S.TERMINATED
    assert await ending(deps, replica_id) == ("drained", "drained: no calls in flight")


async def test_the_drain_timeout_ends_the_wait_for_a_hung_call(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps
) -> None:
    async with engine_in_process(MODEL) as hung:
        [replica_id] = await make_ready(client, deps, MODEL, hung.chat_url)
        await hung.set_faults(hang=True)  # once READY: its probes needed answers
        _, key = await issue_key(client)
        call = asyncio.create_task(
            anon_client.post(
                "/v1/chat/completions", json={**STREAM, "stream": False}, headers={"Authorization": f"Bearer {key}"}
            )
        )
        await until_running(hung, 1)
        deleted = time.monotonic()
        assert (await client.delete(f"/api/v1/replicas/{replica_id}")).status_code == 204
        await reconcile_job(deps)
        assert await status(deps, replica_id) == S.DRAINING

        async with asyncio.timeout(10):
            while await status(deps, replica_id) == S.DRAINING:
                await reconcile_job(deps)
                await asyncio.sleep(0.05)  # the timeout is a time: the test waits for it by polling, as the job does
        assert time.monotonic() - deleted >= TIMEOUT_S
        assert await status(deps, replica_id) == S.TERMINATED
        assert await ending(deps, replica_id) == ("drain_timeout", "drain timeout after 1 s: 1 in-flight call cut")
        answer = await call  # cut by the gateway, as a replica that broke off: the client is not left hanging
        assert answer.status_code == 502, answer.text


async def test_calls_from_before_an_unhealthy_spell_are_still_waited_for(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, slow: Engine
) -> None:
    """A replica that leaves the pool (UNHEALTHY) and comes back READY while a call runs keeps counting that call."""
    [replica_id] = await make_ready(client, deps, MODEL, slow.chat_url)
    _, key = await issue_key(client)
    stream = asyncio.create_task(
        anon_client.post("/v1/chat/completions", json=STREAM, headers={"Authorization": f"Bearer {key}"})
    )
    await until_running(slow, 1)
    assert await deps.store.move(replica_id, S.READY, S.UNHEALTHY, "probe_failed")
    await deps.catalog.reload()
    assert await deps.store.move(replica_id, S.UNHEALTHY, S.READY, "recovered")
    await deps.catalog.reload()

    assert (await client.delete(f"/api/v1/replicas/{replica_id}")).status_code == 204
    assert not await reconcile_job(deps)
    assert await status(deps, replica_id) == S.DRAINING
    assert (await stream).text.rstrip().endswith("data: [DONE]")
    assert await reconcile_job(deps)
    reason, message = await ending(deps, replica_id)
    assert (reason, (message or "").startswith("drained: 1 in-flight call finished in ")) == ("drained", True), message
