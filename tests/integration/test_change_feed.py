"""The change feed on a real PostgreSQL, two feeds standing for two instances: one's announcement makes the other
reload (and nudge the jobs for fleet changes), never itself; a burst is acted on together; a listening connection
ended by the server, or lost to an outage, comes back and hears again, having reloaded for what it missed. On SQLite
nothing is sent."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator.store.db import make_engine
from orchestrator.store.notify import CHANNEL, LISTENER_NAME, Change, ChangeFeed
from tests.support.postgres import PostgresServer


@dataclass
class Instance:
    """What a feed acts on, counted."""

    feed: ChangeFeed = field(init=False)
    reloads: int = 0
    nudges: int = 0
    reloading: asyncio.Event = field(default_factory=asyncio.Event)
    gate: asyncio.Event | None = None
    """While set to an unset event, a reload waits for it (a slow reload, for a burst to pile up behind)."""

    async def reload(self) -> None:
        self.reloading.set()
        if self.gate is not None:
            await self.gate.wait()
        self.reloads += 1

    def nudge(self) -> None:
        self.nudges += 1


async def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "gave up waiting"
        await asyncio.sleep(0.005)


@pytest.fixture
async def engine(postgres: PostgresServer) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(await postgres.new_database())
    yield engine
    await engine.dispose()


@pytest.fixture
async def pair(engine: AsyncEngine) -> AsyncIterator[tuple[Instance, Instance]]:
    a, b = Instance(), Instance()
    for it in (a, b):
        it.feed = ChangeFeed(engine, it.reload, it.nudge)
        await it.feed.start()
    yield a, b
    for it in (a, b):
        await it.feed.stop()


def _dsn(engine: AsyncEngine) -> str:
    return make_url(engine.url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.mark.postgres
async def test_a_change_made_on_one_instance_reloads_the_other_at_once_and_never_itself(
    pair: tuple[Instance, Instance],
) -> None:
    a, b = pair
    await a.feed.made(Change.KEYS)()
    assert a.reloads == 1  # its own reload, before the change's answer
    await until(lambda: b.reloads == 1)
    assert b.nudges == 0  # a key is none of the jobs' business

    await b.feed.made(Change.REPLICAS)()
    await until(lambda: a.reloads == 2)
    assert b.reloads == 2  # its own, once: what it announced came back to it and was ignored


@pytest.mark.postgres
async def test_work_for_the_jobs_nudges_the_reconcile_job_here_and_on_every_other_instance(
    pair: tuple[Instance, Instance],
) -> None:
    a, b = pair
    a.feed.wake()  # a service's nudge: a replica registered
    assert a.nudges == 1
    await until(lambda: b.nudges == 1)
    await a.feed.announce(Change.KEYS)  # heard after the nudge: b has acted on it
    await until(lambda: b.reloads == 1)
    assert (a.reloads, a.nudges, b.nudges) == (0, 1, 1)  # and nothing was reloaded for the nudge itself


@pytest.mark.postgres
async def test_a_burst_of_changes_is_one_reload_behind_the_one_under_way(
    pair: tuple[Instance, Instance], engine: AsyncEngine
) -> None:
    a, b = pair
    b.gate = asyncio.Event()
    await a.feed.announce(Change.KEYS)
    await asyncio.wait_for(b.reloading.wait(), 10)  # b reloads, and stays in it
    for _ in range(20):
        await a.feed.announce(Change.ACCOUNTS)
    await a.feed.announce(Change.WORK)
    conn = await asyncpg.connect(_dsn(engine))
    try:  # the last one, from a third party, says b heard everything before the gate opens
        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, json.dumps({"from": "x", "kind": "endpoints"}))
    finally:
        await conn.close()
    # Notifications reach a listener in commit order: once the last is heard, so are the others.
    await until(lambda: Change.ENDPOINTS in b.feed.pending)
    assert b.reloads == 0
    b.gate.set()
    await until(lambda: b.reloads == 2)
    assert b.nudges == 1  # the work among them
    assert not b.feed.pending  # and nothing more to act on: 23 notifications, 2 reloads


@pytest.mark.postgres
async def test_an_unreadable_notification_reloads_everything(
    pair: tuple[Instance, Instance], engine: AsyncEngine
) -> None:
    _, b = pair
    conn = await asyncpg.connect(_dsn(engine))
    try:
        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, "not json")
    finally:
        await conn.close()
    await until(lambda: b.reloads == 1)
    assert b.nudges == 1


async def _listeners(engine: AsyncEngine) -> list[int]:
    conn = await asyncpg.connect(_dsn(engine))
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()",
            LISTENER_NAME,
        )
        return [int(r["pid"]) for r in rows]
    finally:
        await conn.close()


@pytest.mark.postgres
async def test_a_listening_connection_ended_by_the_server_comes_back_and_hears_again(
    pair: tuple[Instance, Instance], engine: AsyncEngine
) -> None:
    a, b = pair
    old = await _listeners(engine)
    assert len(old) == 2
    conn = await asyncpg.connect(_dsn(engine))
    try:
        await conn.execute("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", old)
    finally:
        await conn.close()
    # Each comes back, and reloads for what it may have missed meanwhile.
    await until(lambda: a.reloads == 1 and b.reloads == 1)
    new = await _listeners(engine)
    assert len(new) == 2
    assert not set(new) & set(old)
    await a.feed.made(Change.ENDPOINTS)()
    await until(lambda: b.reloads == 2)


async def test_on_sqlite_a_change_only_reloads_here(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'one.db'}")
    it = Instance()
    it.feed = ChangeFeed(engine, it.reload, it.nudge)
    try:
        await it.feed.start()
        await it.feed.made(Change.MODELS)()
        it.feed.wake()
        assert (it.reloads, it.nudges) == (1, 1)
    finally:
        await it.feed.stop()
        await engine.dispose()


@pytest.mark.postgres
async def test_a_database_outage_is_one_warning_and_one_line_at_its_end_and_then_changes_are_heard_again() -> None:
    with PostgresServer.serving(private=True) as server:
        engine = make_engine(await server.new_database())
        a, b = Instance(), Instance()
        with structlog.testing.capture_logs() as logs:
            try:
                for it in (a, b):
                    it.feed = ChangeFeed(engine, it.reload, it.nudge)
                    await it.feed.start()
                server.pause()
                try:
                    await until(lambda: _count(logs, "changes.listener_down") == 2)
                finally:
                    server.resume()
                await until(lambda: _count(logs, "changes.listener_back") == 2, timeout_s=30)
                await until(lambda: a.reloads == b.reloads == 1)  # what changed meanwhile was not heard
                await a.feed.made(Change.KEYS)()
                await until(lambda: b.reloads == 2)
            finally:
                for it in (a, b):
                    await it.feed.stop()
                await engine.dispose()
    assert _count(logs, "changes.listener_down") == 2  # one per listener, however many attempts failed
    assert not [e for e in logs if e["log_level"] in {"error", "critical"}], logs


def _count(logs: list[MutableMapping[str, Any]], event: str) -> int:
    return len([e for e in logs if e["event"] == event])
