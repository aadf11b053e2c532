"""The one module that registers the scheduled jobs (APScheduler 3.11, in-process, memory job store)."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from orchestrator.deps import Deps
from orchestrator.reconcile import reconcile

RECONCILE = "reconcile"


async def reconcile_job(deps: Deps) -> None:
    deps.nudge.take()
    await reconcile(deps.store)
    while deps.nudge.take():  # nudged while running
        await reconcile(deps.store)


def build_scheduler(deps: Deps) -> AsyncIOScheduler:
    """Register every job; `deps.nudge` is connected so admin actions run the reconciler at once."""
    scheduler = AsyncIOScheduler(
        timezone=UTC,
        # A job that falls behind runs once, never as a burst; one instance of each at a time.
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
    )
    scheduler.add_job(
        reconcile_job,
        "interval",
        seconds=deps.settings.reconcile_interval_s,
        args=[deps],
        id=RECONCILE,
        next_run_time=datetime.now(UTC),
    )

    def wake() -> None:
        with contextlib.suppress(JobLookupError):  # shutting down
            scheduler.modify_job(RECONCILE, next_run_time=datetime.now(UTC))

    deps.nudge.connect(wake)
    return scheduler
