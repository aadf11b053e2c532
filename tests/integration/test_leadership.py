"""One leader for the fleet's jobs, on both databases: contenders racing for the lease never both win, the lead
passes on when the leader goes (or its connection dies), and a runtime runs the leader's jobs only while it leads."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from structlog.testing import capture_logs

from orchestrator.fleet.replicas import ReplicaSpec
from orchestrator.platform.settings import Settings
from orchestrator.runtime.compose import Runtime, build_deps
from orchestrator.runtime.jobs import LEADER_JOBS
from orchestrator.runtime.leader import Leadership, Lease, PgLease, lease_for
from orchestrator.store.db import make_engine
from tests.support.postgres import PostgresServer
from tests.support.settings import instance_settings

INSTANCE_JOBS = {"records_flush", "catalog_refresh"}


@pytest.fixture
async def engines(database_url: str) -> AsyncIterator[Callable[[], AsyncEngine]]:
    """Engines on the test's database, one per contender, as separate processes would have."""
    made: list[AsyncEngine] = []

    def make() -> AsyncEngine:
        made.append(make_engine(database_url))
        return made[-1]

    yield make
    for engine in made:
        await engine.dispose()


def contender(engines: Callable[[], AsyncEngine], tmp_path: Path, name: str) -> Lease:
    return lease_for(engines(), tmp_path, name)


async def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "gave up waiting"
        await asyncio.sleep(0.01)


async def test_contenders_racing_for_the_lease_never_both_win(
    engines: Callable[[], AsyncEngine], tmp_path: Path
) -> None:
    leases = [contender(engines, tmp_path, f"host:{n}") for n in range(6)]
    for _ in range(3):
        won = await asyncio.gather(*(lease.acquire() for lease in leases))
        assert won.count(True) == 1, won
        leader = leases[won.index(True)]
        assert await leader.held()
        # Nobody takes it while it is held, however often they try.
        assert [await lease.acquire() for lease in leases if lease is not leader] == [False] * 5
        await leader.release()
        assert not await leader.held()


async def test_the_lead_passes_on_when_the_leader_stops(engines: Callable[[], AsyncEngine], tmp_path: Path) -> None:
    events: list[str] = []

    def leadership(name: str) -> Leadership:
        async def acquired() -> None:
            events.append(f"{name} leads")

        async def lost() -> None:
            events.append(f"{name} stops")

        lease = contender(engines, tmp_path, name)
        return Leadership(lease, identity=name, on_acquired=acquired, on_lost=lost, interval_s=0.05)

    first, second = leadership("a"), leadership("b")
    await first.start()
    await second.start()
    try:
        assert (first.leading, second.leading) == (True, False)
        await second.tick()
        assert not second.leading
        await first.stop()  # its jobs stop before the lease is given back
        await until(lambda: second.leading)
        assert events == ["a leads", "a stops", "b leads"]
    finally:
        await first.stop()
        await second.stop()
    assert events == ["a leads", "a stops", "b leads", "b stops"]


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_leader_whose_connection_dies_stops_leading_and_another_takes_over(
    engines: Callable[[], AsyncEngine], tmp_path: Path
) -> None:
    lost: list[str] = []

    async def nothing() -> None:
        pass

    async def on_lost() -> None:
        lost.append("a")

    first = Leadership(
        contender(engines, tmp_path, "a"), identity="a", on_acquired=nothing, on_lost=on_lost, interval_s=0.05
    )
    second = Leadership(
        contender(engines, tmp_path, "b"), identity="b", on_acquired=nothing, on_lost=nothing, interval_s=0.05
    )
    await first.start()
    await second.start()
    try:
        assert first.leading
        async with engines().connect() as conn:
            # What a broken network or a restarted server does to the leader's session.
            killed = await conn.scalar(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'orchestrator-leader a'"
                )
            )
        assert killed is True
        await until(lambda: second.leading)
        await until(lambda: lost == ["a"])
        assert not first.leading
    finally:
        await first.stop()
        await second.stop()


async def test_only_the_leading_runtime_runs_the_leaders_jobs_and_the_other_takes_them_over(
    settings: Settings,
) -> None:
    scheduled = settings.model_copy(update={"scheduler": True, "lead_retry_s": 0.05})
    first, second = Runtime(build_deps(scheduled)), Runtime(build_deps(scheduled))
    await first.start()
    first_running = True
    try:
        await second.start()
        try:
            assert (first.leading, second.leading) == (True, False)
            assert first.scheduled_jobs() == INSTANCE_JOBS | set(LEADER_JOBS)
            assert second.scheduled_jobs() == INSTANCE_JOBS
            first_running = False
            await first.stop()
            await until(lambda: second.leading)
            assert second.scheduled_jobs() == INSTANCE_JOBS | set(LEADER_JOBS)
        finally:
            await second.stop()
    finally:
        if first_running:
            await first.stop()


async def test_an_instance_that_may_not_lead_never_does(settings: Settings) -> None:
    serving_only = Runtime(build_deps(settings.model_copy(update={"scheduler": True, "lead": False})))
    await serving_only.start()
    try:
        assert not serving_only.leading
        assert serving_only.scheduled_jobs() == INSTANCE_JOBS
    finally:
        await serving_only.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def fresh_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database with no schema yet, as a first start finds it."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    name = f"fresh_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(make_url(server.admin_url).set(drivername="postgresql").render_as_string(False))
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return server.url_for(name)


async def test_processes_starting_together_on_a_fresh_database_migrate_it_once(
    fresh_database: str, tmp_path: Path
) -> None:
    """Two granian workers start at the same moment: one migrates, the other waits and finds the schema made."""
    settings = instance_settings(tmp_path / "state", fresh_database)
    runtimes = [Runtime(build_deps(settings)) for _ in range(3)]
    try:
        await asyncio.gather(*(runtime.start() for runtime in runtimes))
        async with runtimes[0].deps.engine.connect() as conn:
            assert await conn.scalar(text("SELECT version_num FROM alembic_version")) is not None
    finally:
        for runtime in runtimes:
            await runtime.stop()


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_runtime_that_lost_the_lead_stops_its_jobs_and_leads_again_with_fresh_ones(
    settings: Settings,
) -> None:
    runtime = Runtime(build_deps(settings.model_copy(update={"scheduler": True, "lead_retry_s": 0.05})))
    await runtime.start()
    try:
        first_managed = runtime.deps.managed
        assert runtime.term is runtime.deps  # the first term runs on the objects the API shares
        with capture_logs() as logs:
            async with runtime.deps.engine.connect() as conn:
                killed = await conn.scalar(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name LIKE 'orchestrator-leader %'"
                    )
                )
            assert killed is True
            await until(
                lambda: [e["event"] for e in logs if e["event"].startswith("leader.")][-1:] == ["leader.acquired"]
            )
        assert [e["event"] for e in logs if e["event"].startswith("leader.")] == [
            "leader.connection_lost",
            "leader.lost",
            "leader.acquired",
        ]
        await until(lambda: runtime.leading)  # the new term's jobs are in place
        assert runtime.scheduled_jobs() == INSTANCE_JOBS | set(LEADER_JOBS)
        # The new term's jobs work: a new replica is taken to STARTING by the reconcile job, on its own.
        model = await runtime.deps.models.create("after-the-loss")
        assert model.id is not None
        replica_id = await runtime.deps.replicas.create(model.id, ReplicaSpec(endpoint="http://127.0.0.1:99/v1"))

        async def status() -> str | None:
            replica = await runtime.deps.store.replica(replica_id)
            return None if replica is None else replica.status

        deadline = time.monotonic() + 10
        while await status() != "STARTING":
            assert time.monotonic() < deadline, "the new term never reconciled"
            await asyncio.sleep(0.02)
        # The first term's VM work was stopped for good; the new one has its own, which works.
        term = runtime.term
        assert term is not None
        assert term.managed is not first_managed
        assert await term.managed.in_thread(lambda: 42) == 42
        with pytest.raises(RuntimeError, match="after shutdown"):
            await first_managed.in_thread(lambda: 42)
    finally:
        await runtime.stop()


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_leader_gone_silent_without_closing_its_connection_loses_the_lock(
    engines: Callable[[], AsyncEngine],
) -> None:
    """A leader's machine that vanishes (power, network) closes nothing: the database lets its lock go anyway."""
    silent = PgLease(engines(), "vanished:1", silent_after_s=0.5)
    other = PgLease(engines(), "other:2")
    assert await silent.acquire()
    assert not await other.acquire()
    deadline = time.monotonic() + 10
    while not await other.acquire():  # the silent one never checks its lease again
        assert time.monotonic() < deadline, "the silent leader's lock was never let go"
        await asyncio.sleep(0.05)
    assert not await silent.held()
    await other.release()
