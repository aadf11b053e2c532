"""LlmEndpoint's durable queue `/api/v1/qcompletions`: admitted at submission as the sync route admits, worked by the
`tasks` job with bounded concurrency against a real engine simulator, charged once, looked up only by its key, and
taken back after a crash (or given up on, past its attempts)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from orchestrator.domain.money import CREDIT, UNIT
from orchestrator.platform.settings import Settings
from orchestrator.runtime.compose import Runtime, build_deps
from orchestrator.runtime.container import Deps
from orchestrator.runtime.jobs import tasks_job
from orchestrator.store.tables import CompletionTask, utcnow
from orchestrator.surfaces.llmendpoint.completions import parse
from tests.support.engines import Engine, engine_in_process
from tests.support.gateway import balance_units, funded_key, make_ready
from tests.support.settings import ADMIN_KEY, instance_settings

MODEL = "llama3.1"  # in the seeded rate table: 0.01 cents per input character, 0.02 per output token
PATH = "/api/v1/qcompletions"
QUESTION = "What is the meaning of life?"  # 28 characters
BODY = {"messages": [{"role": "user", "content": QUESTION}], "model": MODEL, "max_tokens": 5}
COST = 3800 * CREDIT  # BODY's credits: (28 x 0.01 + 5 x 0.02) cents / 0.0001
WORKERS = 2


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    """Two workers, and failed attempts due again almost at once (the default waits 5 s)."""
    return instance_settings(tmp_path / "state", database_url).model_copy(
        update={"task_workers": WORKERS, "task_retry_after_s": 0.05, "task_max_attempts": 3}
    )


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    async with engine_in_process(MODEL, max_tokens=8) as e:
        yield e


async def submit(anon_client: httpx.AsyncClient, key: str, body: object = BODY) -> str:
    r = await anon_client.post(PATH, json=body, headers={"Authorization": key})
    assert r.status_code == 200, r.text
    assert r.json()["success"] is True
    assert r.json()["message"] == "Request queued successfully"
    return str(r.json()["task_id"])


async def task_of(anon_client: httpx.AsyncClient, key: str, task_id: str) -> dict[str, Any]:
    r = await anon_client.get(f"{PATH}/{task_id}", headers={"Authorization": key})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def poll(
    check: Callable[[], Awaitable[bool]], tick: Callable[[], Awaitable[None]] | None = None, timeout_s: float = 15
) -> None:
    """Until `check` holds, running `tick` (the job, as the scheduler would) between looks; never past the deadline."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "gave up waiting"
        if tick is not None:
            await tick()
        await asyncio.sleep(0.01)


async def until_status(
    anon_client: httpx.AsyncClient, key: str, task_id: str, statuses: set[str], deps: Deps | None = None
) -> dict[str, Any]:
    """Poll the task until it is in one of `statuses`; with `deps`, the job runs between looks."""
    seen: dict[str, Any] = {}

    async def check() -> bool:
        seen.update(await task_of(anon_client, key, task_id))
        return seen["status"] in statuses

    await poll(check, (lambda: tasks_job(deps)) if deps is not None else None)
    return seen


def stored() -> str:
    """BODY as the queue stores it."""
    return parse(msgspec.json.encode(BODY)).stored()


def iso(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    assert moment.utcoffset() == timedelta(0), text  # UTC, said so
    return moment


async def test_a_queued_task_completes_with_the_engines_text_and_is_charged_once(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, engine: Engine
) -> None:
    await make_ready(client, deps, MODEL, engine.chat_url)
    key_id, key = await funded_key(client)
    sync = await anon_client.post("/api/v1/completions", json=BODY, headers={"Authorization": key})
    assert sync.status_code == 200, sync.text
    before = await balance_units(deps, key_id)

    task_id = await submit(anon_client, key, {**BODY, "stream": True})  # `stream` is ignored: a task is whole
    assert uuid.UUID(task_id).version == 4
    queued = await task_of(anon_client, key, task_id)
    assert queued["status"] == "queued"
    assert (queued["result"], queued["completed_at"]) == (None, None)
    assert set(queued) == {"success", "status", "result", "created_at", "completed_at"}
    assert iso(queued["created_at"]) <= utcnow()

    await tasks_job(deps)
    await deps.tasks.idle()
    done = await task_of(anon_client, key, task_id)
    assert done["status"] == "completed", done
    assert done["result"] == sync.json()["response"]  # the engine is deterministic: the same words
    assert done["result"].split()
    assert iso(done["created_at"]) <= iso(done["completed_at"]) <= utcnow()
    assert "error" not in done
    assert before - await balance_units(deps, key_id) == COST
    sent = (await engine.chats())[-1]["body"]
    assert (sent["max_tokens"], sent["stream"]) == (5, False)
    assert "truncate_prompt_tokens" not in sent  # no num_context asked: the engine's own context


async def test_once_the_job_has_run_a_submission_is_worked_at_once(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, engine: Engine
) -> None:
    await make_ready(client, deps, MODEL, engine.chat_url)
    _, key = await funded_key(client)
    await tasks_job(deps)  # the scheduler's first tick: nothing queued yet
    task_id = await submit(anon_client, key)
    done = await until_status(anon_client, key, task_id, {"completed", "failed"})  # no job call in between
    assert done["status"] == "completed", done


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"model": MODEL, "max_tokens": 5}, 400, "messages, model, max_tokens, and temperature are required"),
        (
            {"messages": BODY["messages"], "model": MODEL},
            400,
            "messages, model, max_tokens, and temperature are required",
        ),
        ({**BODY, "max_tokens": "many"}, 400, "Invalid request"),
        ({**BODY, "messages": []}, 400, "Invalid request"),
        ([1, 2], 400, "Invalid request"),
        ({**BODY, "model": "no-such-model"}, 400, "Model pricing not found"),
        ({**BODY, "model": "llama3"}, 400, "Max attempts reached - no available hosts"),  # priced, not served
    ],
)
async def test_a_request_the_sync_route_refuses_is_refused_at_submission(  # noqa: PLR0917
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, body: object, status: int, message: str
) -> None:
    _, key = await funded_key(client)
    r = await anon_client.post(PATH, json=body, headers={"Authorization": key})
    assert (r.status_code, r.json()["success"], r.json()["message"]) == (status, False, message)
    r = await anon_client.post(PATH, content=b"{not json", headers={"Authorization": key})
    assert (r.status_code, r.json()["message"]) == (400, "Invalid request")
    assert await deps.tasks.store.counts() == {}  # nothing queued


async def test_a_short_balance_is_a_402_at_once(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, engine: Engine
) -> None:
    await make_ready(client, deps, MODEL, engine.chat_url)
    _, short = await funded_key(client, str(Decimal(COST - CREDIT) / UNIT))
    r = await anon_client.post(PATH, json=BODY, headers={"Authorization": short})
    assert (r.status_code, r.json()) == (402, {"success": False, "message": "Insufficient credits"})
    assert await deps.tasks.store.counts() == {}


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "Authorization header required"),
        ({"Authorization": "sk-not-a-key"}, "Invalid API key"),
        ({"Authorization": "Bearer sk-not-a-key"}, "Invalid API key"),
    ],
)
async def test_keys_are_refused_with_llmendpoints_words(
    anon_client: httpx.AsyncClient, headers: dict[str, str], message: str
) -> None:
    r = await anon_client.post(PATH, json=BODY, headers=headers)
    assert (r.status_code, r.json()) == (401, {"success": False, "message": message})
    r = await anon_client.get(f"{PATH}/{uuid.uuid4()}", headers=headers)
    assert (r.status_code, r.json()) == (401, {"success": False, "message": message})


async def test_a_key_with_an_ip_allowlist_is_refused_elsewhere(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient
) -> None:
    r = await client.post("/api/v1/generate_api_key", json={"user_id": "far", "allowed_ips": ["10.1.2.3"]})
    r = await anon_client.post(PATH, json=BODY, headers={"Authorization": r.json()["api_key"]})
    assert (r.status_code, r.json()) == (401, {"success": False, "message": "Unauthorized IP address"})


async def test_a_task_is_seen_only_by_its_own_key(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, engine: Engine
) -> None:
    await make_ready(client, deps, MODEL, engine.chat_url)
    _, alice = await funded_key(client, user="alice")
    _, bob = await funded_key(client, user="bob")
    task_id = await submit(anon_client, alice)
    r = await anon_client.get(f"{PATH}/{task_id}", headers={"Authorization": f"Bearer {bob}"})
    assert (r.status_code, r.json()) == (403, {"success": False, "message": "Unauthorized"})
    for unknown in (str(uuid.uuid4()), "not-a-uuid", "x" * 80):
        r = await anon_client.get(f"{PATH}/{unknown}", headers={"Authorization": alice})
        assert (r.status_code, r.json()) == (404, {"success": False, "message": "Task not found"})
    assert (await task_of(anon_client, f"Bearer {alice}", task_id))["status"] == "queued"


async def test_no_more_tasks_run_at_once_than_there_are_workers(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps
) -> None:
    async with engine_in_process(MODEL, max_tokens=8, ttft_s=0.15) as slow:
        await make_ready(client, deps, MODEL, slow.chat_url)
        await slow.clear_log()
        _, key = await funded_key(client)
        ids = [await submit(anon_client, key) for _ in range(5)]
        peak = 0

        async def all_done() -> bool:
            nonlocal peak
            counts = await deps.tasks.store.counts()
            assert counts.get("processing", 0) <= WORKERS, counts
            assert deps.tasks.running <= WORKERS
            peak = max(peak, counts.get("processing", 0))
            return counts == {"completed": 5}

        await tasks_job(deps)  # one tick; finished tasks pull the next ones themselves
        await poll(all_done)
        assert peak == WORKERS
        assert (await slow.log())["peak_running"] == WORKERS
        # Oldest first: tasks started in the order they were queued.
        rows = [await deps.tasks.store.task(i) for i in ids]
        started = [row.started_at for row in rows if row is not None and row.started_at is not None]
        assert len(started) == len(ids)
        assert started == sorted(started)


async def test_a_failing_host_is_retried_then_the_task_fails_uncharged(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, engine: Engine
) -> None:
    await make_ready(client, deps, MODEL, engine.chat_url)
    await engine.clear_log()
    key_id, key = await funded_key(client)
    await engine.set_faults(fail_rate=1.0)
    task_id = await submit(anon_client, key)
    failed = await until_status(anon_client, key, task_id, {"completed", "failed"}, deps)
    assert failed["status"] == "failed"
    assert (failed["error"], failed["result"]) == ("The model's host failed.", None)
    assert iso(failed["completed_at"]) >= iso(failed["created_at"])
    row = await deps.tasks.store.task(task_id)
    assert row is not None
    assert row.attempts == 3
    assert len(await engine.chats()) == 3
    assert await balance_units(deps, key_id) == UNIT


async def test_with_no_host_a_task_waits_for_one(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps
) -> None:
    r = await client.post("/api/v1/models", json={"name": MODEL})  # priced and registered, but no replica yet
    assert r.status_code == 201, r.text
    await deps.catalog.reload()
    key_id, key = await funded_key(client)
    task_id = await submit(anon_client, key)

    async def tried() -> bool:
        row = await deps.tasks.store.task(task_id)
        return row is not None and row.started_at is not None and row.status == "queued"

    await poll(tried, lambda: tasks_job(deps))
    row = await deps.tasks.store.task(task_id)
    assert row is not None
    assert row.attempts == 0  # waiting for a host is not a failed attempt
    async with engine_in_process(MODEL, max_tokens=8) as engine:
        await make_ready(client, deps, MODEL, engine.chat_url)
        done = await until_status(anon_client, key, task_id, {"completed", "failed"}, deps)
    assert done["status"] == "completed", done
    assert UNIT - await balance_units(deps, key_id) == COST


async def test_a_task_that_waited_too_long_for_a_host_fails_with_llmendpoints_words(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps
) -> None:
    await client.post("/api/v1/models", json={"name": MODEL})
    key_id, key = await funded_key(client)
    old = utcnow() - timedelta(seconds=deps.settings.task_host_wait_s + 1)
    task_id = str(uuid.uuid4())
    await deps.tasks.store.add(CompletionTask(id=task_id, key_id=key_id, model=MODEL, request=stored(), created_at=old))
    failed = await until_status(anon_client, key, task_id, {"completed", "failed"}, deps)
    assert (failed["status"], failed["error"]) == ("failed", "Max attempts reached - no available hosts")


async def test_a_clean_stop_puts_the_running_task_back_uncharged(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, engine: Engine
) -> None:
    await make_ready(client, deps, MODEL, engine.chat_url)
    key_id, key = await funded_key(client)
    await engine.set_faults(hang=True)
    task_id = await submit(anon_client, key)
    await tasks_job(deps)
    await until_status(anon_client, key, task_id, {"processing"})

    async def engine_has_it() -> bool:
        return len(await engine.chats()) == 1

    await poll(engine_has_it)
    await deps.tasks.close()
    row = await deps.tasks.store.task(task_id)
    assert row is not None
    assert (row.status, row.attempts, row.started_at) == ("queued", 0, None)  # due at once at the next start
    assert await balance_units(deps, key_id) == UNIT


async def test_a_restart_takes_back_interrupted_tasks_and_gives_up_on_a_poison_one(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, engine: Engine, settings: Settings
) -> None:
    await make_ready(client, deps, MODEL, engine.chat_url)
    await engine.clear_log()
    key_id, key = await funded_key(client)
    # What a SIGKILLed server leaves: tasks `processing`; one of them has crashed it on each of its 3 claims.
    interrupted, poison = str(uuid.uuid4()), str(uuid.uuid4())
    for task_id, attempts in ((interrupted, 1), (poison, 3)):
        await deps.tasks.store.add(
            CompletionTask(
                id=task_id,
                key_id=key_id,
                model=MODEL,
                request=stored(),
                status="processing",
                attempts=attempts,
                started_at=utcnow(),
            )
        )
    # A second instance on the same database, started as `serve` starts one: with its scheduler.
    restarted = Runtime(build_deps(settings.model_copy(update={"scheduler": True})))
    await restarted.start()
    try:
        done = await until_status(anon_client, key, interrupted, {"completed", "failed"})  # no job call: the tick
    finally:
        await restarted.stop()
    assert done["status"] == "completed", done
    assert done["result"].split()
    given_up = await task_of(anon_client, key, poison)
    assert (given_up["status"], given_up["error"], given_up["result"]) == ("failed", "gave up after 3 attempts", None)
    assert given_up["completed_at"] is not None
    assert len(await engine.chats()) == 1  # the poison task never reached the engine again
    row = await deps.tasks.store.task(interrupted)
    assert row is not None
    assert row.attempts == 2
    assert UNIT - await balance_units(deps, key_id) == COST  # charged by the instance that ran it


async def test_two_instances_claiming_at_once_never_take_the_same_task(
    client: httpx.AsyncClient, deps: Deps, settings: Settings
) -> None:
    key_id, _ = await funded_key(client)
    for _ in range(6):
        await deps.tasks.store.add(CompletionTask(id=str(uuid.uuid4()), key_id=key_id, model=MODEL, request=stored()))
    other = build_deps(settings)
    try:
        mine, theirs = await asyncio.gather(
            deps.tasks.store.claim(4, retry_after_s=1), other.tasks.store.claim(4, retry_after_s=1)
        )
    finally:
        await other.engine.dispose()
    assert len(mine) + len(theirs) == 6
    assert not {t.id for t in mine} & {t.id for t in theirs}
    assert all((t.status, t.attempts) == ("processing", 1) for t in [*mine, *theirs])
    assert await deps.tasks.store.counts() == {"processing": 6}


async def test_a_body_over_the_limit_and_the_admin_key_are_refused_in_llmendpoints_envelope(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps
) -> None:
    _, key = await funded_key(client)
    too_big = b"x" * (deps.settings.max_body_bytes + 1)
    r = await anon_client.post(PATH, content=too_big, headers={"Authorization": key})
    assert (r.status_code, r.json()["success"]) == (413, False)
    r = await anon_client.post(PATH, json=BODY, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert (r.status_code, r.json()["message"]) == (403, "Unauthorized")  # the admin key owns no tasks
    assert await deps.tasks.store.counts() == {}
