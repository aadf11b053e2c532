"""The change feed over each of its channels, a real PostgreSQL's `NOTIFY` and a real Redis's pub/sub, two feeds
standing for two instances: one's announcement makes the other reload (and nudge the jobs for fleet changes), never
itself; a burst is acted on together; a listening connection ended by the server, or lost to an outage, comes back and
hears again, having reloaded for what it missed. With no channel (one process on SQLite) nothing is sent."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import asyncpg
import pytest
import redis.asyncio
import structlog
from sqlalchemy.engine import make_url

from orchestrator.platform.redis_channel import RedisChannel
from orchestrator.store.db import make_engine
from orchestrator.store.notify import (
    CHANNEL,
    CHECK_EVERY_S,
    CHECK_TIMEOUT_S,
    LISTENER_NAME,
    Change,
    ChangeFeed,
    Channel,
    PostgresChannel,
)
from tests.support.postgres import PostgresServer
from tests.support.redis import RedisServer


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


@dataclass
class Server:
    """A channel's server, and what a third party does to it."""

    channel: Callable[[], Channel]
    """A new channel to it, as an instance makes."""
    send: Callable[[str], Awaitable[None]]
    """A notification from elsewhere (another process, another version), whole as given."""
    listeners: Callable[[], Awaitable[list[int]]]
    """The ids of the connections listening now."""
    end: Callable[[list[int]], Awaitable[None]]
    """The server ends these connections."""


@asynccontextmanager
async def on_postgres(postgres: PostgresServer) -> AsyncIterator[Server]:
    engine = make_engine(await postgres.new_database())
    dsn = make_url(engine.url).set(drivername="postgresql").render_as_string(hide_password=False)

    async def run(query: str, *args: Any) -> list[Any]:
        conn = await asyncpg.connect(dsn)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    async def send(payload: str) -> None:
        await run("SELECT pg_notify($1, $2)", CHANNEL, payload)

    async def listeners() -> list[int]:
        query = "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()"
        return [int(r["pid"]) for r in await run(query, LISTENER_NAME)]

    async def end(pids: list[int]) -> None:
        await run("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", pids)

    try:
        yield Server(lambda: PostgresChannel(engine), send, listeners, end)
    finally:
        await engine.dispose()


@asynccontextmanager
async def on_redis(server: RedisServer) -> AsyncIterator[Server]:
    name = f"orch:{RedisServer.new_namespace()}:changes"
    client = redis.asyncio.Redis.from_url(server.url)

    async def send(payload: str) -> None:
        await client.publish(name, payload)

    async def listeners() -> list[int]:
        return [int(c["id"]) for c in await client.client_list() if c["name"] == name]

    async def end(ids: list[int]) -> None:
        for client_id in ids:
            await client.client_kill_filter(_id=str(client_id))

    try:
        channel = partial(RedisChannel, server.url, name, timeout_s=CHECK_TIMEOUT_S, check_every_s=CHECK_EVERY_S)
        yield Server(channel, send, listeners, end)
    finally:
        await client.aclose()


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres), "redis"])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[Server]:
    made: AbstractAsyncContextManager[Server]
    if request.param == "postgres":
        made = on_postgres(request.getfixturevalue("postgres"))
    else:
        made = on_redis(request.getfixturevalue("redis_server"))
    async with made as it:
        yield it


@pytest.fixture
async def pair(server: Server) -> AsyncIterator[tuple[Instance, Instance]]:
    a, b = Instance(), Instance()
    for it in (a, b):
        it.feed = ChangeFeed(server.channel(), it.reload, it.nudge)
        await it.feed.start()
    yield a, b
    for it in (a, b):
        await it.feed.stop()


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


async def test_a_burst_of_changes_is_one_reload_behind_the_one_under_way(
    pair: tuple[Instance, Instance], server: Server
) -> None:
    a, b = pair
    b.gate = asyncio.Event()
    await a.feed.announce(Change.KEYS)
    await asyncio.wait_for(b.reloading.wait(), 10)  # b reloads, and stays in it
    for _ in range(20):
        await a.feed.announce(Change.ACCOUNTS)
    await a.feed.announce(Change.WORK)
    # The last one, from a third party, says b heard everything before the gate opens: notifications reach a
    # listener in the order they were sent.
    await server.send(json.dumps({"from": "x", "kind": "endpoints"}))
    await until(lambda: Change.ENDPOINTS in b.feed.pending)
    assert b.reloads == 0
    b.gate.set()
    await until(lambda: b.reloads == 2)
    assert b.nudges == 1  # the work among them
    assert not b.feed.pending  # and nothing more to act on: 23 notifications, 2 reloads


async def test_an_unreadable_notification_reloads_everything(pair: tuple[Instance, Instance], server: Server) -> None:
    _, b = pair
    await server.send("not json")
    await until(lambda: b.reloads == 1)
    assert b.nudges == 1


async def test_a_flood_of_unreadable_notifications_is_a_line_per_reload(
    pair: tuple[Instance, Instance], server: Server
) -> None:
    a, b = pair
    await a.feed.stop()  # b alone listens
    b.gate = asyncio.Event()
    with structlog.testing.capture_logs() as logs:
        for _ in range(50):
            await server.send("not json")
        await server.send(json.dumps({"from": "x", "kind": "keys"}))  # the last one: every one before is heard
        await until(lambda: b.reloading.is_set() and Change.KEYS in b.feed.pending)
        b.gate.set()
        await until(lambda: b.reloads == 2 and not b.feed.pending)
    assert 1 <= _count(logs, "changes.unreadable_notification") <= 2  # one per burst, not one per message


async def test_a_listening_connection_ended_by_the_server_comes_back_and_hears_again(
    pair: tuple[Instance, Instance], server: Server
) -> None:
    a, b = pair
    old = await server.listeners()
    assert len(old) == 2
    await server.end(old)
    # Each comes back, and reloads for what it may have missed meanwhile.
    await until(lambda: a.reloads == 1 and b.reloads == 1)
    new = await server.listeners()
    assert len(new) == 2
    assert not set(new) & set(old)
    await a.feed.made(Change.ENDPOINTS)()
    await until(lambda: b.reloads == 2)


async def test_with_no_channel_a_change_only_reloads_here() -> None:
    it = Instance()
    it.feed = ChangeFeed(None, it.reload, it.nudge)
    try:
        await it.feed.start()
        await it.feed.made(Change.MODELS)()
        it.feed.wake()
        assert (it.reloads, it.nudges) == (1, 1)
    finally:
        await it.feed.stop()


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres), "redis"])
def private(
    request: pytest.FixtureRequest,
) -> Iterator[tuple[PostgresServer | RedisServer, Callable[[], AbstractAsyncContextManager[Server]]]]:
    """A server of the test's own, to stop and start again, and how to reach it."""
    if request.param == "postgres":
        with PostgresServer.serving(private=True) as pg:
            yield pg, lambda: on_postgres(pg)
    else:
        rs = RedisServer.private()
        try:
            yield rs, lambda: on_redis(rs)
        finally:
            rs.stop()


async def test_an_outage_is_one_warning_and_one_line_at_its_end_and_then_changes_are_heard_again(
    private: tuple[PostgresServer | RedisServer, Callable[[], AbstractAsyncContextManager[Server]]],
) -> None:
    outage, reach = private
    a, b = Instance(), Instance()
    with structlog.testing.capture_logs() as logs:
        async with reach() as server:
            try:
                for it in (a, b):
                    it.feed = ChangeFeed(server.channel(), it.reload, it.nudge)
                    await it.feed.start()
                outage.pause()
                try:
                    await until(lambda: _count(logs, "changes.listener_down") == 2)
                    await a.feed.announce(Change.KEYS)  # lost, not raised: b reloads everything when it is back
                finally:
                    outage.resume()
                await until(lambda: _count(logs, "changes.listener_back") == 2, timeout_s=30)
                await until(lambda: a.reloads == b.reloads == 1)  # what changed meanwhile was not heard
                await a.feed.made(Change.KEYS)()
                await until(lambda: b.reloads == 2)
            finally:
                for it in (a, b):
                    await it.feed.stop()
    assert _count(logs, "changes.listener_down") == 2  # one per listener, however many attempts failed
    assert _count(logs, "changes.not_announced") == 1
    assert not [e for e in logs if e["log_level"] in {"error", "critical"}], logs


def _count(logs: list[MutableMapping[str, Any]], event: str) -> int:
    return len([e for e in logs if e["event"] == event])
