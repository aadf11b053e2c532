"""The jobs as the scheduler holds them: each one a coroutine function that APScheduler awaits on the event loop
(an awaitable object of another kind would be run in a thread and never awaited: no job would ever run)."""

from __future__ import annotations

from apscheduler.util import iscoroutinefunction_partial

from orchestrator.runtime.container import Deps
from orchestrator.runtime.jobs import build_scheduler


async def test_every_job_is_a_coroutine_function_the_scheduler_awaits(deps: Deps) -> None:
    jobs = build_scheduler(deps).get_jobs()
    assert {job.id for job in jobs} >= {"reconcile", "probe", "records_flush", "tasks"}
    assert [job.id for job in jobs if not iscoroutinefunction_partial(job.func)] == []
