"""Changes between instances: after an admin change commits, a notification says what it touched; every instance
listens on a connection of its own and acts at once (its catalog reloads), instead of at its next periodic refresh.
The channel is PostgreSQL's `NOTIFY` when the instances share one PostgreSQL, and a Redis pub/sub channel when they
share a SQLite file and a Redis (the workers of one `serve --workers N`). The periodic refresh stays the net for what
a notification cannot carry: one sent while an instance was reconnecting, or never sent because its sender died
between the commit and the notification. With neither (one process on SQLite) nothing is sent or heard.

Notifications arriving together are acted on once (a burst of changes is one reload), and an instance ignores its
own (it reloaded before it answered)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any, Protocol

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information
import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator.store.db import root_cause, unreachable

log = structlog.get_logger(__name__)

CHANNEL = "orchestrator_changes"
LISTENER_NAME = "orchestrator-changes"
"""The listening connection's `application_name`, as `pg_stat_activity` shows it."""
RETRY_FIRST_S = 0.1
RETRY_MAX_S = 5.0
CHECK_EVERY_S = 10.0
"""How often a quiet listening connection is asked whether it still works (a peer gone silently, over TCP)."""
CHECK_TIMEOUT_S = 5.0

# Options of SQLAlchemy's asyncpg dialect that are not asyncpg.connect's.
_DIALECT_ONLY = ("prepared_statement_cache_size", "prepared_statement_name_func", "async_creator_fn")


class Change(StrEnum):
    """What an admin change (or a job's move) touched; the payload of a notification."""

    MODELS = "models"
    REPLICAS = "replicas"
    KEYS = "keys"
    ACCOUNTS = "accounts"
    ENDPOINTS = "endpoints"
    MOVES = "moves"
    """A replica moved by a job (its health, its VM work): the routing pools change."""
    WORK = "work"
    """Work for the jobs (a replica registered or deleted, a model deleted): the reconcile job runs now wherever the
    jobs run; nothing to reload for it."""


EVERYTHING = frozenset(Change)
"""What an instance assumes changed after it could not listen for a while."""

Reload = Callable[[], Awaitable[None]]
_CONNECT_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class Listening(Protocol):
    """A connection listening on a channel."""

    async def until_lost(self) -> str:
        """Hands each notification to the listener until the connection closes or stops answering; says why."""
        ...

    async def close(self) -> None: ...


class Channel(Protocol):
    """Where the instances' notifications go. Each method raises `ConnectionError` when its server cannot be
    reached (now)."""

    async def publish(self, payload: str) -> object: ...

    async def listen(self, heard: Callable[[str], None]) -> Listening: ...

    def close(self) -> None: ...


class PostgresChannel:
    """The channel `CHANNEL` of the instances' PostgreSQL: `NOTIFY` after the change's commit, `LISTEN` on a
    connection of its own (named `LISTENER_NAME`)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def publish(self, payload: str) -> None:
        try:
            async with self._engine.begin() as conn:
                await conn.execute(
                    text("SELECT pg_notify(:channel, :payload)"), {"channel": CHANNEL, "payload": payload}
                )
        except Exception as e:
            if not unreachable(e):
                raise
            raise ConnectionError(str(root_cause(e))) from e

    async def listen(self, heard: Callable[[str], None]) -> _PostgresListening:
        _, params = self._engine.dialect.create_connect_args(self._engine.url)
        for option in _DIALECT_ONLY:
            params.pop(option, None)
        settings = {**params.pop("server_settings", {}), "application_name": LISTENER_NAME}
        try:
            conn = await asyncio.wait_for(asyncpg.connect(**params, server_settings=settings), CHECK_TIMEOUT_S)
        except _CONNECT_ERRORS as e:
            raise ConnectionError(str(e) or type(e).__name__) from e
        try:
            await conn.add_listener(CHANNEL, lambda _conn, _pid, _channel, payload: heard(payload))
        except BaseException as e:
            conn.terminate()
            if isinstance(e, _CONNECT_ERRORS):
                raise ConnectionError(str(e) or type(e).__name__) from e
            raise
        return _PostgresListening(conn)

    def close(self) -> None:
        """Nothing of its own to close: it announces over the engine's pool."""


class _PostgresListening:
    def __init__(self, conn: Any) -> None:  # an asyncpg.Connection
        self._conn = conn

    async def until_lost(self) -> str:
        conn = self._conn
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        while True:
            if conn.is_closed():
                return "connection closed"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), CHECK_EVERY_S)
                return "connection closed"
            try:
                await asyncio.wait_for(conn.fetchval("SELECT 1"), CHECK_TIMEOUT_S)
            except _CONNECT_ERRORS as e:
                return str(e) or type(e).__name__

    async def close(self) -> None:
        conn = self._conn
        if not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), CHECK_TIMEOUT_S)
            except _CONNECT_ERRORS:
                conn.terminate()


class ChangeFeed:
    """Announces this instance's changes and hears the others'.

    `reload` makes this instance's memory follow the database (after its own changes, and when another instance
    changed something); `nudge` asks the reconcile job here to run now (a no-op where the jobs do not run). With no
    `channel` (one process) it only does both here."""

    def __init__(self, channel: Channel | None, reload: Reload, nudge: Callable[[], None]) -> None:
        self.instance = uuid.uuid4().hex[:12]
        self._channel = channel
        self._reload = reload
        self._nudge = nudge
        self._pending: set[Change] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._listening: Listening | None = None
        self._announcing: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> frozenset[Change]:
        """What was heard from other instances and not yet acted on."""
        return frozenset(self._pending)

    def made(self, kind: Change) -> Reload:
        """The `on_change` of a service whose changes are `kind`: tell the others, then reload here."""

        async def changed() -> None:
            await self.announce(kind)
            await self._reload()

        return changed

    def wake(self) -> None:
        """Asks the reconcile job to run now, here and wherever the jobs run: the services' `nudge`. The
        announcement goes out in the background, as the caller cannot wait for it."""
        self._nudge()
        if self._channel is None:
            return
        try:
            task = asyncio.get_running_loop().create_task(self._announce_work())
        except RuntimeError:  # no event loop: nothing is served here either
            return
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)

    async def _announce_work(self) -> None:
        try:
            await self.announce(Change.WORK)
        except Exception:  # nobody awaits this: the jobs' own interval catches up
            log.exception("changes.not_announced", kind=Change.WORK.value)

    async def announce(self, kind: Change) -> None:
        """Tell every listening instance that `kind` changed (after the change committed). A channel that cannot
        be reached now loses the notification, not the change: the others see it at their periodic refresh."""
        if self._channel is None:
            return
        try:
            await self._channel.publish(json.dumps({"from": self.instance, "kind": kind.value}))
        except ConnectionError as e:
            log.warning("changes.not_announced", kind=kind.value, error=str(e))

    async def start(self) -> None:
        """Listen: once this returns, a change another instance commits is heard, unless the channel cannot be
        reached now (then the listener keeps trying in the background)."""
        if self._channel is None or self._tasks:
            return
        try:
            self._listening = await self._channel.listen(self._heard)
        except ConnectionError as e:
            log.warning("changes.listener_down", error=str(e))
        self._tasks = [
            asyncio.create_task(self._listen(self._channel), name="changes-listener"),
            asyncio.create_task(self._apply(), name="changes-apply"),
        ]

    async def stop(self) -> None:
        await asyncio.gather(*self._announcing, return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self._close()
        if self._channel is not None:
            self._channel.close()

    def _heard(self, payload: str) -> None:
        try:
            note = json.loads(payload)
            if note["from"] == self.instance:
                return
            kinds = {Change(note["kind"])}
        except (ValueError, TypeError, KeyError) as e:  # another version's payload: act on everything
            if not self._pending >= EVERYTHING:  # once per burst: a flood of them is one line per reload
                log.warning("changes.unreadable_notification", error=str(e))
            kinds = set(EVERYTHING)
        self._pending |= kinds
        self._wake.set()

    async def _apply(self) -> None:
        """Acts on what was heard, once per burst: notifications arriving while it acts are taken together next."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            kinds, self._pending = frozenset(self._pending), set()
            log.debug("changes.heard", kinds=sorted(kinds))
            try:
                if Change.WORK in kinds:
                    self._nudge()
                if kinds - {Change.WORK}:
                    await self._reload()
            except Exception as e:  # an item boundary: the periodic refresh catches up
                if not unreachable(e):
                    log.exception("changes.apply_failed", kinds=sorted(kinds))
                else:
                    log.warning("changes.apply_failed", kinds=sorted(kinds), error=str(root_cause(e)))

    async def _listen(self, channel: Channel) -> None:
        """Keeps one listening connection, reconnecting with backoff; one warning per outage, one line at its end
        (and then everything is reloaded: what changed meanwhile was not heard)."""
        delay = RETRY_FIRST_S
        down = self._listening is None
        while True:
            if self._listening is None:
                try:
                    self._listening = await channel.listen(self._heard)
                except ConnectionError as e:
                    log.debug("changes.listener_retry", error=str(e), retry_in_s=delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_S)
                    continue
            if down:
                down = False
                log.info("changes.listener_back")
                self._pending |= EVERYTHING
                self._wake.set()
            delay = RETRY_FIRST_S
            error = await self._listening.until_lost()
            await self._close()
            down = True
            log.warning("changes.listener_down", error=error)

    async def _close(self) -> None:
        listening, self._listening = self._listening, None
        if listening is not None:
            await listening.close()
