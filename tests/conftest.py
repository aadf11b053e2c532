"""Fixtures shared by every layer: databases (SQLite and PostgreSQL), settings, deps and the ASGI client."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from api.app import create_app
from orchestrator.platform.settings import Settings
from orchestrator.runtime.compose import Runtime, build_deps
from orchestrator.runtime.container import Deps
from orchestrator.store.db import make_engine, upgrade
from tests.support.aio import run_in_thread
from tests.support.postgres import PostgresServer
from tests.support.redis import RedisServer
from tests.support.settings import ADMIN_KEY, instance_settings


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    with PostgresServer.serving() as server:
        yield server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """The session's Redis (Debian's redis-server on a Unix socket of its own), for the shared limits."""
    with RedisServer.serving() as server:
        yield server


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of the test's own, which it may stop, freeze and start again."""
    server = RedisServer.private()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"

    async def run() -> None:
        engine = make_engine(f"sqlite+aiosqlite:///{path}")
        try:
            await upgrade(engine)
        finally:
            await engine.dispose()

    run_in_thread(run)
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, migrated database per test, on each backend in turn."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "orchestrator.db"
        shutil.copyfile(template, path)
        return f"sqlite+aiosqlite:///{path}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return await server.new_database()


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return instance_settings(tmp_path / "state", database_url)


@pytest.fixture
async def deps(settings: Settings) -> AsyncIterator[Deps]:
    deps = build_deps(settings)
    try:
        yield deps
    finally:
        await deps.engine.dispose()


@pytest.fixture
async def runtime(deps: Deps) -> AsyncIterator[Runtime]:
    """What the app's lifespan runs (migrations, and the scheduler when enabled), in the test's own loop."""
    runtime = Runtime(deps)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


@pytest.fixture
def transport(runtime: Runtime) -> httpx.ASGITransport:
    """The whole app (gateway and admin API) in the test's own event loop."""
    return httpx.ASGITransport(app=create_app(runtime))


@pytest.fixture
async def anon_client(transport: httpx.ASGITransport) -> AsyncIterator[httpx.AsyncClient]:
    """A client with no credentials."""
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


@pytest.fixture
async def client(transport: httpx.ASGITransport) -> AsyncIterator[httpx.AsyncClient]:
    """A client authenticated as the admin."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=headers) as c:
        yield c
