"""Database engines, sessions and migrations for SQLite (aiosqlite) and PostgreSQL (asyncpg), and telling a
database that cannot be reached now from any other error (`unreachable`, `root_cause`)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel.ext.asyncio.session import AsyncSession

MIGRATIONS = Path(__file__).parent / "migrations"
# Any constant works; it only has to be the same for every instance migrating this database.
_MIGRATION_LOCK_ID = 0x6F726368


def make_engine(url: str) -> AsyncEngine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets the API read while a job writes; foreign keys are off by default in SQLite.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


_DRIVERS = ("sqlalchemy.", "asyncpg.", "aiosqlite.")
_SQLITE_UNREACHABLE = ("database is locked", "unable to open database file", "disk I/O error", "database is full")
_POSTGRES_DOWN = (
    asyncpg.exceptions.PostgresConnectionError,  # SQLSTATE class 08, and a connection closed mid-query
    asyncpg.exceptions.OperatorInterventionError,  # class 57: shutting down, starting up ("cannot connect now")
    asyncpg.exceptions.InsufficientResourcesError,  # class 53: too many connections, out of memory or disk
)


def unreachable(exc: BaseException) -> bool:
    """Whether `exc` says the database cannot be reached now (stopped, restarting, refusing connections, no pooled
    connection free in time) rather than a bug or a row that breaks a rule: a caller may retry it later.

    The drivers say so in many shapes: SQLAlchemy's wrappers (a connection invalidated, OperationalError and
    InterfaceError, its pool's TimeoutError), asyncpg's own errors, or a bare OSError from a connect call
    (ConnectionRefusedError on a port, FileNotFoundError on a Unix socket, gaierror, a timeout). A bare OSError
    only counts when a driver raised it, not when the code that called the database did."""
    return any(_says_unreachable(e) for e in _causes(exc))


def _says_unreachable(e: BaseException) -> bool:
    if isinstance(e, sa_exc.DBAPIError) and e.connection_invalidated:
        return True
    if isinstance(e, (sa_exc.OperationalError, sa_exc.InterfaceError)) and isinstance(e.orig, sqlite3.Error):
        # SQLite reports a bug (no such table, a syntax error) as an OperationalError too: only these are the file's.
        return any(words in str(e.orig) for words in _SQLITE_UNREACHABLE)
    if isinstance(e, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, sa_exc.DisconnectionError)):
        return True
    if isinstance(e, _POSTGRES_DOWN):
        return True
    return isinstance(e, OSError) and _raised_by_a_driver(e)


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception `exc` wraps: what to log (SQLAlchemy's own text carries the statement and its
    parameters)."""
    *_, last = _causes(exc)
    return last


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and what it wraps, outermost first (explicit causes, then implicit contexts)."""
    seen: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and not any(e is s for s in seen):
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def _raised_by_a_driver(e: BaseException) -> bool:
    tb = e.__traceback__
    while tb is not None:
        if str(tb.tb_frame.f_globals.get("__name__", "")).startswith(_DRIVERS):
            return True
        tb = tb.tb_next
    return False


def make_sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def _migrate(connection: Connection, revision: str, *, down: bool = False) -> None:
    sqlite = connection.dialect.name == "sqlite"
    if connection.dialect.name == "postgresql":
        # Several instances may start at once: the first migrates, the others wait and find head.
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_ID})")
    if sqlite:
        # Migrations copy whole SQLite tables (batch mode): a DROP TABLE with foreign keys on would run its children's
        # ON DELETE CASCADE. The pragma only takes outside a transaction, so before the first statement that opens one.
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    (command.downgrade if down else command.upgrade)(alembic_config(connection), revision)
    if sqlite and (broken := connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()):
        raise RuntimeError(f"the migrations left rows whose foreign keys point nowhere: {broken[:5]}")


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Bring the schema to the newest migration (a no-op when it is there already)."""
    await _run(engine, lambda c: _migrate(c, revision))


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    """Take the schema back to `revision` ("base": nothing)."""
    await _run(engine, lambda c: _migrate(c, revision, down=True))


async def _run(engine: AsyncEngine, migrate: Callable[[Connection], None]) -> None:
    async with engine.connect() as conn:
        async with conn.begin():
            await conn.run_sync(migrate)
        if conn.dialect.name == "sqlite":
            await conn.invalidate()  # it has foreign keys off: never handed out again by the pool
