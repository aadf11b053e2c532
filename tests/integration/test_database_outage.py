"""A database that cannot be reached: every admin surface answers 503 with Retry-After in its own envelope (never a
500), logs one warning per refused call, and works again once the database is back; the gateway keeps serving
from memory all along. On a PostgreSQL cluster of this module's own (the session's shared one is never stopped)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator.platform.settings import Settings
from orchestrator.runtime.container import Deps
from orchestrator.runtime.jobs import probe_job, quiet, records_flush_job
from orchestrator.store.db import make_engine, unreachable
from tests.support.engines import Engine, engine_in_process, free_port
from tests.support.gateway import issue_key, make_ready
from tests.support.postgres import PostgresServer
from tests.support.settings import instance_settings

pytestmark = pytest.mark.postgres

MODEL = "outage-model"
DOWN = "The database cannot be reached right now; try again shortly."
BOT_HOOK = "/bot/feishu/helper/webhook/event"
REFUSED_CALLS = 10
"""The calls of `_call_every_surface` that need the database."""


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[PostgresServer]:
    with PostgresServer.serving(private=True) as server:
        yield server


@pytest.fixture
async def settings(tmp_path: Path, own_postgres: PostgresServer) -> Settings:
    """The shared test settings, on a fresh database of the module's own cluster."""
    return instance_settings(tmp_path / "state", await own_postgres.new_database())


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    async with engine_in_process(MODEL) as e:
        yield e


def _refused(r: httpx.Response) -> Any:
    assert r.status_code == 503, (r.request.method, r.request.url.path, r.status_code, r.text)
    assert r.headers["retry-after"] == "5"
    assert r.headers["content-type"].startswith("application/json")
    return r.json()


async def test_admin_surfaces_answer_503_in_their_envelopes_while_the_gateway_serves(
    client: httpx.AsyncClient,
    anon_client: httpx.AsyncClient,
    deps: Deps,
    own_postgres: PostgresServer,
    engine: Engine,
) -> None:
    [replica_id] = await make_ready(client, deps, MODEL, engine.chat_url)
    _, key = await issue_key(client, "outage")
    applied = (await client.post("/admin/api-key/apply", json={"name": "jack", "month_quota": 1})).json()
    br_key = applied["data"]["api_key"]

    own_postgres.pause()
    try:
        with structlog.testing.capture_logs() as logs:
            await _call_every_surface(client, anon_client, replica_id, key, br_key)
    finally:
        own_postgres.resume()

    warnings = [e for e in logs if e["event"] == "database.unreachable"]
    assert len(warnings) == REFUSED_CALLS  # one line per refused call
    assert {e["log_level"] for e in warnings} == {"warning"}
    assert {e["error"] for e in warnings} == {"FileNotFoundError"}  # the socket is gone: said plainly, no SQL
    assert not [e for e in logs if e["log_level"] in {"error", "critical"}], logs

    await _until_answering(client)  # the pool reconnects by itself
    assert [m["name"] for m in (await client.get("/api/v1/models")).json()] == [MODEL]


async def _call_every_surface(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, replica_id: int, key: str, br_key: str
) -> None:
    """Admin routes of each surface while the database is down; then the gateway."""
    # toolkit: {"error": message}
    assert _refused(await client.get("/api/v1/models")) == {"error": DOWN}
    assert _refused(await client.post("/api/v1/models", json={"name": "new"})) == {"error": DOWN}
    assert _refused(await client.delete(f"/api/v1/replicas/{replica_id}")) == {"error": DOWN}
    # the connector, admin and user routes and the Feishu receiver: {"success": false, "data": message}
    expected = {"success": False, "data": DOWN}
    assert _refused(await client.get("/admin/model/list")) == expected
    assert _refused(await client.get("/admin/statistics/total")) == expected
    mine = await anon_client.get("/user/api-key/mine", headers={"Authorization": f"Bearer {br_key}"})
    assert _refused(mine) == expected
    assert _refused(await anon_client.post(BOT_HOOK, json={"type": "url_verification"})) == expected
    # Moonshot: {"error": [message]}
    assert _refused(await client.get("/v1/llm_endpoints")) == {"error": [DOWN]}
    # LlmEndpoint's task queue: {"success": false, "message"}
    task = await anon_client.get(
        "/api/v1/qcompletions/00000000-0000-4000-8000-000000000000", headers={"Authorization": key}
    )
    assert _refused(task) == {"success": False, "message": DOWN}
    assert _refused(await anon_client.get("/metrics")) == {"error": DOWN}

    # The gateway is served from memory: it still answers.
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    r = await anon_client.post("/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text


async def _until_answering(client: httpx.AsyncClient) -> None:
    """Poll (with a deadline) until the admin API reads the database again."""
    async with asyncio.timeout(15):
        while (await client.get("/api/v1/models")).status_code != 200:  # noqa: ASYNC110 (nothing to wait on but the server)
            await asyncio.sleep(0.05)


async def test_what_counts_as_unreachable(own_postgres: PostgresServer) -> None:
    """Real failures of real drivers: a closed port and a stopped server are; a broken rule and a bare OSError
    raised outside any driver are not."""
    closed = make_engine(f"postgresql+asyncpg://orch@127.0.0.1:{free_port()}/none")
    with pytest.raises(ConnectionRefusedError) as refused:
        await _run(closed, "SELECT 1")
    await closed.dispose()
    assert unreachable(refused.value)

    live = make_engine(await own_postgres.new_database())
    with pytest.raises(IntegrityError) as broken:
        await _run(live, "CREATE TEMPORARY TABLE t (x integer NOT NULL)", "INSERT INTO t VALUES (NULL)")
    assert not unreachable(broken.value)
    own_postgres.pause()
    try:
        with pytest.raises(Exception) as down:  # noqa: PT011 (which one is the point of the assertion)
            await _run(live, "SELECT 1")
    finally:
        own_postgres.resume()
        await live.dispose()
    assert unreachable(down.value), repr(down.value)
    assert not unreachable(FileNotFoundError("/no/such/file"))
    assert not unreachable(ValueError("a bug"))


def test_a_sqlite_bug_is_not_an_outage_but_a_missing_file_is(tmp_path: Path) -> None:
    """SQLite calls both an OperationalError: a query on a table that does not exist is a bug (a 500 and its
    traceback), a database file that cannot be opened is the database being unreachable. (The driver's errors are
    the same through aiosqlite; the plain driver leaves no thread behind a failed connect.)"""
    engine = create_engine(f"sqlite:///{tmp_path / 'here.db'}")
    with pytest.raises(OperationalError) as bug, engine.connect() as conn:
        conn.execute(text("SELECT * FROM no_such_table"))
    engine.dispose()
    assert not unreachable(bug.value)
    (tmp_path / "there.db").mkdir()  # a directory where the file should be: it cannot be opened
    gone = create_engine(f"sqlite:///{tmp_path / 'there.db'}")
    with pytest.raises(OperationalError) as down, gone.connect():
        pass
    gone.dispose()
    assert unreachable(down.value), repr(down.value)


async def _run(engine: AsyncEngine, *statements: str) -> None:
    async with engine.begin() as conn:
        for statement in statements:
            await conn.execute(text(statement))


async def test_jobs_warn_once_per_outage_and_calls_answered_meanwhile_are_written_after(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, own_postgres: PostgresServer, engine: Engine
) -> None:
    await make_ready(client, deps, MODEL, engine.chat_url)
    key_id, key = await issue_key(client, "outage")
    flush, probe = quiet(records_flush_job, "records_flush"), quiet(probe_job, "probe")
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    own_postgres.pause()
    try:
        with structlog.testing.capture_logs() as logs:
            for _ in range(3):  # the gateway answers from memory; every call waits in the journal
                r = await anon_client.post(
                    "/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {key}"}
                )
                assert r.status_code == 200, r.text
                await flush(deps)
                await probe(deps)
        warned = sorted(entry["job"] for entry in logs if entry["event"] == "database.unreachable")
        assert warned == ["probe", "records_flush"]  # once each, not at every tick
    finally:
        own_postgres.resume()
    with structlog.testing.capture_logs() as logs:
        await flush(deps)
    assert [entry["job"] for entry in logs if entry["event"] == "database.reachable_again"] == ["records_flush"]
    threads = (await client.get(f"/admin/thread/list?key_id={key_id}")).json()["data"]
    assert threads["total"] == 3
