"""Changes between instances on one PostgreSQL: after an admin change commits, a `NOTIFY` says what it touched; every
instance `LISTEN`s on a connection of its own and acts at once (its catalog reloads), instead of at its next
periodic refresh. That refresh stays the net for what a notification cannot carry: one sent while an instance was
reconnecting, or never sent because its sender died between the commit and the `NOTIFY`. On SQLite (one process)
nothing is sent or heard.

Notifications arriving together are acted on once (a burst of changes is one reload), and an instance ignores its
own (it reloaded before it answered)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any

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


class ChangeFeed:
    """Announces this instance's changes and hears the others'.

    `reload` makes this instance's memory follow the database (after its own changes, and when another instance
    changed something); `nudge` asks the reconcile job here to run now (a no-op where the jobs do not run)."""

    def __init__(self, engine: AsyncEngine, reload: Reload, nudge: Callable[[], None]) -> None:
        self.instance = uuid.uuid4().hex[:12]
        self._engine = engine
        self._reload = reload
        self._nudge = nudge
        self._shared = engine.dialect.name == "postgresql"
        self._pending: set[Change] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._conn: Any = None  # asyncpg.Connection while listening
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
        if not self._shared:
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
        """Tell every listening instance that `kind` changed (after the change committed). A database that cannot
        be reached now loses the notification, not the change: the others see it at their periodic refresh."""
        if not self._shared:
            return
        payload = json.dumps({"from": self.instance, "kind": kind.value})
        try:
            async with self._engine.begin() as conn:
                await conn.execute(
                    text("SELECT pg_notify(:channel, :payload)"), {"channel": CHANNEL, "payload": payload}
                )
        except Exception as e:
            if not unreachable(e):
                raise
            log.warning("changes.not_announced", kind=kind.value, error=str(root_cause(e)))

    async def start(self) -> None:
        """Listen (on PostgreSQL): once this returns, a change another instance commits is heard, unless the
        database cannot be reached now (then the listener keeps trying in the background)."""
        if not self._shared or self._tasks:
            return
        try:
            self._conn = await self._connect()
        except _CONNECT_ERRORS as e:
            log.warning("changes.listener_down", error=str(e))
        self._tasks = [
            asyncio.create_task(self._listen(), name="changes-listener"),
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

    def _heard(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            note = json.loads(payload)
            if note["from"] == self.instance:
                return
            kinds = {Change(note["kind"])}
        except (ValueError, TypeError, KeyError) as e:  # another version's payload: act on everything
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

    async def _listen(self) -> None:
        """Keeps one listening connection, reconnecting with backoff; one warning per outage, one line at its end
        (and then everything is reloaded: what changed meanwhile was not heard)."""
        delay = RETRY_FIRST_S
        down = self._conn is None
        while True:
            if self._conn is None:
                try:
                    self._conn = await self._connect()
                except _CONNECT_ERRORS as e:
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
            error = await self._until_lost(self._conn)
            await self._close()
            down = True
            log.warning("changes.listener_down", error=error)

    async def _until_lost(self, conn: Any) -> str:
        """Waits until `conn` closes (the server ended it) or stops answering; says why."""
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

    async def _connect(self) -> Any:
        _, params = self._engine.dialect.create_connect_args(self._engine.url)
        for option in _DIALECT_ONLY:
            params.pop(option, None)
        settings = {**params.pop("server_settings", {}), "application_name": LISTENER_NAME}
        conn = await asyncio.wait_for(asyncpg.connect(**params, server_settings=settings), CHECK_TIMEOUT_S)
        try:
            await conn.add_listener(CHANNEL, self._heard)
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), CHECK_TIMEOUT_S)
            except _CONNECT_ERRORS:
                conn.terminate()
