"""The one module that registers the scheduled jobs (APScheduler 3.11, in-process, memory job store): the
instance's own, which every instance runs, and the leader's, which one instance at a time runs (`runtime.leader`)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import structlog
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from orchestrator.fleet.drain import Drain
from orchestrator.fleet.reconcile import reconcile
from orchestrator.fleet.sweeps import orphan_sweep, rules_drift
from orchestrator.runtime.container import Deps
from orchestrator.store.db import root_cause, unreachable

log = structlog.get_logger(__name__)

Job = Callable[[Deps], Awaitable[None]]
RECONCILE = "reconcile"
PROBE = "probe"
TASKS = "tasks"
ENGINE_LOAD = "engine_load"
LEADER_JOBS = (RECONCILE, PROBE, "rules_drift", "orphan_sweep", TASKS, ENGINE_LOAD)
"""The jobs only the leader runs: they act on the fleet and the task queue, which one actor at a time must do."""


def _job_context(name: str) -> None:
    # A job started by a nudge inherits the context of the request that nudged: start clean.
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(job=name)


async def reconcile_job(deps: Deps) -> None:
    _job_context(RECONCILE)
    deps.nudge.take()
    drain = Drain(deps.catalog, deps.settings.drain_timeout_s)
    await deps.keeper.keep()  # the replicas it makes or drains are moved on by the reconcile below
    moved = await reconcile(deps.store, deps.managed, drain)
    while deps.nudge.take():  # nudged while running
        await deps.keeper.keep()
        moved |= await reconcile(deps.store, deps.managed, drain)
    if moved:
        deps.probe_nudge()  # a replica that reached STARTING is probed at once, not at the next tick


async def probe_job(deps: Deps) -> None:
    _job_context(PROBE)
    deps.probe_nudge.take()
    moved = await deps.health.run()
    while deps.probe_nudge.take():
        moved |= await deps.health.run()
    if moved:
        deps.nudge()  # a replica that passed its probes may have VM work next (SECURING)


async def engine_load_job(deps: Deps) -> None:
    """Scrapes every READY replica's `/metrics`: the load the autoscaler reads at the next reconcile."""
    _job_context(ENGINE_LOAD)
    await deps.engine_load.scrape()


async def records_flush_job(deps: Deps) -> None:
    _job_context("records_flush")
    await deps.records.flush()


async def rules_drift_job(deps: Deps) -> None:
    _job_context("rules_drift")
    await rules_drift(deps.managed)


async def orphan_sweep_job(deps: Deps) -> None:
    _job_context("orphan_sweep")
    await orphan_sweep(deps.managed)


async def tasks_job(deps: Deps) -> None:
    """Claims due queued completions; from its first run on, submissions and finished tasks claim at once too."""
    _job_context(TASKS)
    await deps.tasks.run()


async def catalog_refresh_job(deps: Deps) -> None:
    _job_context("catalog_refresh")
    await deps.catalog.reload()


def quiet(job: Job, name: str) -> Job:
    """`job`, quiet while the database cannot be reached: one warning when the outage starts and one line when it
    ends, instead of a traceback at every tick. Anything else still raises (APScheduler logs it). A plain coroutine
    function, as APScheduler must see (a callable object would be run in a thread and never awaited)."""
    down = False

    @functools.wraps(job)
    async def run(deps: Deps) -> None:
        nonlocal down
        try:
            await job(deps)
        except Exception as e:
            if not unreachable(e):
                raise
            if not down:
                down = True
                log.warning("database.unreachable", job=name, error=str(root_cause(e)))
            return
        if down:
            down = False
            log.info("database.reachable_again", job=name)

    return run


def build_scheduler(deps: Deps, *, leading: bool = True) -> AsyncIOScheduler:
    """Register the instance's own jobs, and the leader's too when `leading` (a lone instance); `deps.nudge` is
    connected so admin actions run the reconciler at once."""
    scheduler = AsyncIOScheduler(
        timezone=UTC,
        # A job that falls behind runs once, never as a burst; one instance of each at a time.
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
    )
    settings = deps.settings
    # Every instance: each has its own journal to write and its own catalog to keep fresh.
    instance_jobs = (
        (records_flush_job, "records_flush", settings.usage_flush_interval_s),
        (catalog_refresh_job, "catalog_refresh", settings.catalog_refresh_interval_s),
    )
    _add(scheduler, deps, instance_jobs)
    if leading:
        add_leader_jobs(scheduler, deps)
    return scheduler


def add_leader_jobs(scheduler: AsyncIOScheduler, deps: Deps) -> None:
    """The jobs that act on the fleet and the task queue, which exactly one instance (the leader) runs, each at
    once and then at its interval."""
    settings = deps.settings
    leader_jobs = (
        (reconcile_job, RECONCILE, settings.reconcile_interval_s),
        # Ticks often; each replica is only probed when its own interval is due.
        (probe_job, PROBE, min(1.0, max(0.1, settings.probe_starting_interval_s))),
        (rules_drift_job, "rules_drift", settings.rules_drift_interval_s),
        (orphan_sweep_job, "orphan_sweep", settings.orphan_sweep_interval_s),
        (tasks_job, TASKS, settings.task_interval_s),
        (engine_load_job, ENGINE_LOAD, settings.engine_load_interval_s),
    )
    _add(scheduler, deps, leader_jobs)

    def waker(job_id: str) -> Callable[[], None]:
        def wake() -> None:
            with contextlib.suppress(JobLookupError):  # shutting down, or no longer leading
                scheduler.modify_job(job_id, next_run_time=datetime.now(UTC))

        return wake

    deps.nudge.connect(waker(RECONCILE))
    deps.probe_nudge.connect(waker(PROBE))


def remove_leader_jobs(scheduler: AsyncIOScheduler, deps: Deps) -> None:
    """No more runs of the leader's jobs here (a run under way ends by itself; the caller stops the work it
    started)."""
    deps.nudge.connect(None)
    deps.probe_nudge.connect(None)
    for job_id in LEADER_JOBS:
        with contextlib.suppress(JobLookupError):
            scheduler.remove_job(job_id)


def _add(scheduler: AsyncIOScheduler, deps: Deps, jobs: tuple[tuple[Job, str, float], ...]) -> None:
    now = datetime.now(UTC)
    for job, job_id, seconds in jobs:
        scheduler.add_job(quiet(job, job_id), "interval", seconds=seconds, args=[deps], id=job_id, next_run_time=now)
