"""A private PostgreSQL cluster for the test session: started here, on a Unix socket, thrown away after.

Nothing is skipped when PostgreSQL is missing: the session fails and says how to install it.
`ORCH_TEST_POSTGRES_URL` (a superuser URL) points the tests at an existing server instead.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from sqlalchemy.engine import make_url

from orchestrator.store.db import make_engine, upgrade
from tests.support.aio import run_in_thread

TEMPLATE = "orch_template"


def _bindir() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    for path in reversed(candidates):
        if (Path(path) / "initdb").exists():
            return Path(path)
    raise RuntimeError(
        "PostgreSQL server binaries (initdb) not found: run scripts/test, which installs Debian's postgresql"
    )


@dataclass
class PostgresServer:
    admin_url: str  # SQLAlchemy URL of the maintenance database, as a superuser
    _datadir: Path | None = None
    _run_as: list[str] | None = None

    @classmethod
    def start(cls) -> PostgresServer:
        if url := os.environ.get("ORCH_TEST_POSTGRES_URL"):
            return cls(url)
        return cls.private()

    @classmethod
    @contextmanager
    def serving(cls, *, private: bool = False) -> Iterator[PostgresServer]:
        """A server with the migrated template ready, stopped afterwards: the session's (an existing one when
        `ORCH_TEST_POSTGRES_URL` says so), or a `private` one a test may stop and start."""
        server = cls.private() if private else cls.start()
        try:
            server.prepare_template()
            yield server
        finally:
            server.stop()

    @classmethod
    def private(cls) -> PostgresServer:
        """A cluster of this process's own, on a Unix socket: one a test may stop and start (`pause`, `resume`)."""
        bindir = _bindir()
        base = Path(tempfile.mkdtemp(prefix="orch-pg-"))  # short: socket paths are limited to ~107 bytes
        run_as: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            user = pwd.getpwnam("postgres")
            os.chown(base, user.pw_uid, user.pw_gid)
            run_as = ["runuser", "-u", "postgres", "--"]
        data = base / "data"
        subprocess.run(
            [*run_as, str(bindir / "initdb"), "-D", str(data), "-U", "orch", "-A", "trust", "--no-sync", "-E", "UTF8"],
            check=True,
            capture_output=True,
        )
        server = cls(f"postgresql+asyncpg://orch@/postgres?host={base}", data, run_as)
        server._bindir = bindir
        server.resume()
        return server

    def resume(self) -> None:
        """Start the (private) server on its data directory, and wait until it takes connections."""
        assert self._datadir is not None, "an existing server (ORCH_TEST_POSTGRES_URL) is not ours to start"
        base = self._datadir.parent
        options = f"-k {base} -c listen_addresses='' -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._pg_ctl("-l", str(base / "log"), "-w", "-o", options, "start")

    def pause(self) -> None:
        """Stop the (private) server at once, keeping its data: an outage, or the first half of a restart."""
        assert self._datadir is not None, "an existing server (ORCH_TEST_POSTGRES_URL) is not ours to stop"
        self._pg_ctl("-m", "fast", "-w", "stop")

    def _pg_ctl(self, *args: str, check: bool = True) -> None:
        command = [*(self._run_as or []), str(self._bindir / "pg_ctl"), "-D", str(self._datadir), *args]
        subprocess.run(command, check=check, capture_output=True)

    def stop(self) -> None:
        if self._datadir is None:
            return
        self._pg_ctl("-m", "immediate", "stop", check=False)
        shutil.rmtree(self._datadir.parent, ignore_errors=True)

    def url_for(self, database: str) -> str:
        return make_url(self.admin_url).set(database=database).render_as_string(hide_password=False)

    def _dsn(self) -> str:
        return make_url(self.admin_url).set(drivername="postgresql").render_as_string(hide_password=False)

    async def _execute(self, sql: str) -> None:
        conn = await asyncpg.connect(self._dsn())
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def prepare_template(self) -> None:
        """One migrated database that every test database is copied from."""

        async def run() -> None:
            await self._execute(f"DROP DATABASE IF EXISTS {TEMPLATE}")
            await self._execute(f"CREATE DATABASE {TEMPLATE}")
            engine = make_engine(self.url_for(TEMPLATE))
            try:
                await upgrade(engine)
            finally:
                await engine.dispose()

        run_in_thread(run)

    async def new_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:16]}"
        await self._execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
        return self.url_for(name)

    _bindir: Path = Path()
