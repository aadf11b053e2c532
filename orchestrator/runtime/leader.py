"""Who leads the fleet's jobs: exactly one instance at a time, through a lease every contender tries each second.

On PostgreSQL the lease is a session-level advisory lock held on one dedicated connection for as long as the
instance leads: when the leader dies, its connection closes and the lock goes with it, and the next contender to
try takes it. Losing that connection while alive is losing the lead: the caller stops the leader's jobs at once.
On SQLite (one machine) an exclusive `flock` on a file beside the database plays the same role, so two processes
(or two granian workers) on one SQLite file never both lead.

The same locks, waited for, keep processes that start together from running the migrations at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Protocol

import structlog
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from orchestrator.store.db import root_cause, unreachable

log = structlog.get_logger(__name__)

LOCK_KEY = 0x6F72_6368_6C65_6164
"""The advisory lock's key ("orchlead"); advisory locks are per database, so deployments never share one."""
MIGRATE_KEY = 0x6F72_6368_6D69_6772
"""The advisory lock the migrations run under ("orchmigr")."""
SILENT_AFTER_S = 10.0
"""PostgreSQL ends the lock's session after this long without a word from the leader (`idle_session_timeout`)."""
CHECK_TIMEOUT_S = 5.0
"""A lock connection that does not answer a ping within this is taken as lost (a leader must know it leads)."""


def instance_id() -> str:
    """This process, as the logs and the lock's connection name it: hostname:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Lease(Protocol):
    async def acquire(self) -> bool:
        """Take the lease if it is free (never waits for it); True: this instance leads from now."""

    async def held(self) -> bool:
        """Whether the lease taken is still this instance's (False: lost, e.g. its connection closed)."""

    async def release(self) -> None:
        """Give the lease back (idempotent)."""


class PgLease:
    """A session-level `pg_try_advisory_lock` on a connection kept out of the pool while it is held."""

    def __init__(self, engine: AsyncEngine, identity: str, *, silent_after_s: float = SILENT_AFTER_S) -> None:
        self._engine = engine
        self._identity = identity
        self._silent_after_s = silent_after_s
        self._conn: AsyncConnection | None = None

    async def acquire(self) -> bool:
        conn = await self._engine.connect()
        try:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            won = (await conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": LOCK_KEY})).scalar_one()
            if won:
                # Named, so that an operator (and a test) can see who leads in pg_stat_activity.
                name = f"orchestrator-leader {self._identity}"
                await conn.execute(text("SELECT set_config('application_name', :name, false)"), {"name": name})
                # A leader whose machine vanishes closes nothing: PostgreSQL ends its session (and frees the lock)
                # once it has been silent this long. A live leader checks its lease every second.
                timeout = f"{int(self._silent_after_s * 1000)}ms"
                await conn.execute(text("SELECT set_config('idle_session_timeout', :t, false)"), {"t": timeout})
        except BaseException:
            await conn.invalidate()
            await conn.close()
            raise
        if not won:
            await conn.close()
            return False
        self._conn = conn
        return True

    async def held(self) -> bool:
        if self._conn is None:
            return False
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                await self._conn.execute(text("SELECT 1"))
        except Exception as e:  # noqa: BLE001 (any failure of the lock's own connection: the lock cannot be trusted)
            log.warning("leader.connection_lost", error=str(root_cause(e)))
            await self.release()
            return False
        return True

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        # Closing the session is what frees a session lock for sure (an unlock on a broken connection cannot):
        # the connection is discarded rather than returned to the pool with the lock and the name on it.
        with contextlib.suppress(Exception):
            await conn.invalidate()
        with contextlib.suppress(Exception):
            await conn.close()


class FileLease:
    """An exclusive `flock` on `path`; the kernel drops it when the process dies."""

    def __init__(self, path: Path, identity: str) -> None:
        self.path = path
        self._identity = identity
        self._fd: int | None = None

    async def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self._identity}\n".encode(), 0)  # who leads, for an operator
        self._fd = fd
        return True

    async def held(self) -> bool:
        return self._fd is not None  # a lock on a local file is lost only with the process

    async def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases its flock


def lease_for(engine: AsyncEngine, state_dir: Path, identity: str, *, check_every_s: float = 1.0) -> Lease:
    """The database's own lease: an advisory lock on PostgreSQL, a file lock beside a SQLite file. A leader checks
    it every `check_every_s`, so its lock's session is never silent for long enough to be ended."""
    url = make_url(engine.url)
    if url.get_backend_name() != "sqlite":
        return PgLease(engine, identity, silent_after_s=max(SILENT_AFTER_S, 5 * check_every_s))
    database = url.database
    if database and database != ":memory:":
        path = Path(database)
        return FileLease(path.with_name(f"{path.name}.leader"), identity)
    return FileLease(state_dir / "leader.lock", identity)


@contextlib.asynccontextmanager
async def one_at_a_time(engine: AsyncEngine, state_dir: Path) -> AsyncIterator[None]:
    """The block runs in one process at a time among those on the database (waiting for the others): the
    migrations at start, which two processes (two granian workers on a fresh database) must not run together."""
    url = make_url(engine.url)
    if url.get_backend_name() != "sqlite":
        async with engine.connect() as pooled:
            conn = await pooled.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATE_KEY})
            try:
                yield
            finally:
                await conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATE_KEY})
        return
    database = url.database
    path = Path(f"{database}.migrate") if database and database != ":memory:" else state_dir / "migrate.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


Hook = Callable[[], Awaitable[None]]


class Leadership:
    """Tries the lease at start and then every `interval_s`; runs `on_acquired` on winning it and `on_lost` when
    the lease is lost, so that the leader's jobs run exactly while this instance leads."""

    def __init__(
        self, lease: Lease, *, identity: str, on_acquired: Hook, on_lost: Hook, interval_s: float = 1.0
    ) -> None:
        self._lease = lease
        self.identity = identity
        self._on_acquired = on_acquired
        self._on_lost = on_lost
        self._interval_s = interval_s
        self.leading = False
        self._loop: asyncio.Task[None] | None = None
        self._down = False

    async def start(self) -> None:
        """One try now (a lone instance leads from its start), then the periodic ones."""
        await self.tick()
        self._loop = asyncio.create_task(self._run(), name="leadership")

    async def stop(self) -> None:
        """Stop trying; a leader stops its jobs (`on_lost`) before it gives the lease back, so that the next
        leader never overlaps with it."""
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        if self.leading:
            self.leading = False
            try:
                await self._on_lost()
            finally:
                await self._lease.release()
                log.info("leader.released", instance=self.identity)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.tick()
            except Exception:  # the loop must outlive any one try; the next one comes in a second
                log.exception("leader.tick_failed", instance=self.identity)

    async def tick(self) -> None:
        """One round: a leader checks it still holds the lease, anyone else tries to take it."""
        if self.leading:
            if not await self._lease.held():
                self.leading = False
                log.warning("leader.lost", instance=self.identity)
                await self._on_lost()
            return
        try:
            won = await self._lease.acquire()
        except Exception as e:
            if not unreachable(e):
                raise
            if not self._down:
                self._down = True
                log.warning("database.unreachable", job="leadership", error=str(root_cause(e)))
            return
        self._down = False
        if not won:
            return
        log.info("leader.acquired", instance=self.identity)
        try:
            await self._on_acquired()
        except BaseException:  # cancelled or failed half way: whatever it started stops, and the lease goes back
            try:
                await self._on_lost()
            finally:
                await self._lease.release()
            raise
        self.leading = True  # from here on, the leader's jobs run
