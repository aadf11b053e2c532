"""LiteLLM's `/queue/chat/completions`: requests wait in a per-model priority queue until a replica has room
(lower priority first), answer with `x-litellm-priority`, and time out with a 408."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from orchestrator.platform.settings import Settings
from orchestrator.runtime.container import Deps
from tests.support.engines import Engine, engine_in_process
from tests.support.gateway import issue_key, make_ready
from tests.support.settings import instance_settings

MODEL = "queued-model"
PATH = "/queue/chat/completions"


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    """One call at a time per replica, so that a single slow call makes everything else queue."""
    return instance_settings(tmp_path / "state", database_url).model_copy(update={"queue_slots_per_replica": 1})


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    async with engine_in_process(MODEL, max_tokens=4) as e:
        yield e


def chat(tag: str, **extra: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": tag}], **extra}


async def until(condition: object, what: str, deadline_s: float = 10.0) -> None:
    end = time.monotonic() + deadline_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def sent_tags(engine: Engine) -> list[str]:
    """The user messages of the chat calls the engine received, in order of arrival."""
    return [r["body"]["messages"][0]["content"] for r in await engine.chats()]


@pytest.fixture
async def ready(client: httpx.AsyncClient, deps: Deps, engine: Engine) -> str:
    await make_ready(client, deps, MODEL, engine.chat_url)
    return (await issue_key(client, rpm=10_000))[1]


async def _hold_the_replica(
    anon_client: httpx.AsyncClient, deps: Deps, engine: Engine, headers: dict[str, str]
) -> asyncio.Task[httpx.Response]:
    """A call the engine hangs on, holding the model's only replica until it is cancelled."""
    await engine.set_faults(hang=True)
    blocker = asyncio.create_task(anon_client.post(PATH, json=chat("blocker"), headers=headers))
    await until(lambda: sum(t.inflight for t in deps.catalog.pools[MODEL]) == 1, "the blocker to hold the replica")
    return blocker


async def test_under_contention_the_lowest_priority_goes_first(
    anon_client: httpx.AsyncClient, deps: Deps, engine: Engine, ready: str
) -> None:
    headers = {"Authorization": f"Bearer {ready}"}
    blocker = await _hold_the_replica(anon_client, deps, engine, headers)
    waiting = []
    for n, priority in enumerate([5, 1, 3, 1, 0]):
        tag = f"p{priority}-{n}"
        waiting.append(asyncio.create_task(anon_client.post(PATH, json=chat(tag, priority=priority), headers=headers)))
        await until(lambda n=n: deps.queues.waiting(MODEL) == n + 1, f"{tag} to queue")  # type: ignore[misc]
    await engine.set_faults(hang=False)
    blocker.cancel()  # the client leaves: its slot is given back and the queue moves
    answers = await asyncio.gather(*waiting)
    assert [r.status_code for r in answers] == [200] * 5
    assert [r.headers["x-litellm-priority"] for r in answers] == ["5", "1", "3", "1", "0"]
    # One at a time, lowest priority first, first come first among equals.
    assert (await sent_tags(engine))[1:] == ["p0-4", "p1-1", "p1-3", "p3-2", "p5-0"]
    sent = (await engine.chats())[-1]["body"]
    assert "priority" not in sent  # the queue's own field is not the engine's


async def test_a_request_that_waits_too_long_gets_a_408(
    anon_client: httpx.AsyncClient, deps: Deps, engine: Engine, ready: str
) -> None:
    headers = {"Authorization": f"Bearer {ready}"}
    blocker = await _hold_the_replica(anon_client, deps, engine, headers)
    r = await anon_client.post(PATH, json=chat("late", priority=0, timeout=0.2), headers=headers)
    assert r.status_code == 408
    error = r.json()["error"]
    assert error["type"] == "timeout_error"
    assert error["code"] == "408"
    assert "waiting in the queue" in error["message"]
    assert deps.queues.waiting(MODEL) == 0
    blocker.cancel()
    await engine.set_faults(hang=False)
    ok = await anon_client.post(PATH, json=chat("after"), headers=headers)  # the queue is not stuck
    assert ok.status_code == 200
    assert ok.headers["x-litellm-priority"] == "0"


async def test_streams_queue_too(anon_client: httpx.AsyncClient, ready: str) -> None:
    headers = {"Authorization": f"Bearer {ready}"}
    async with anon_client.stream("POST", PATH, json=chat("s", stream=True, priority=2), headers=headers) as r:
        assert r.status_code == 200
        assert r.headers["x-litellm-priority"] == "2"
        events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"priority": "high"}, "priority"), ({"priority": 1.5}, "priority"), ({"timeout": 0}, "timeout")],
)
async def test_bad_queue_fields_are_400s(
    anon_client: httpx.AsyncClient, ready: str, extra: dict[str, object], param: str
) -> None:
    r = await anon_client.post(PATH, json=chat("x", **extra), headers={"Authorization": f"Bearer {ready}"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param


async def test_a_model_with_no_replica_does_not_wait(client: httpx.AsyncClient, anon_client: httpx.AsyncClient) -> None:
    await client.post("/api/v1/models", json={"name": "empty"})
    _, key = await issue_key(client)
    r = await anon_client.post(PATH, json={**chat("x"), "model": "empty"}, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 503
    r = await anon_client.post(PATH, json={**chat("x"), "model": "nope"}, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 400
