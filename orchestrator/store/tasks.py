"""SQL of LlmEndpoint's queued completions (`completion_task`): add, look up, claim, settle, and put back what a
stopped server left. One method is one transaction.

Every write after the claim is guarded by `status = 'processing' AND attempts = <the claim's attempt>`: a task
that was put back and claimed again (by this instance after a restart, or by another) is never settled by the
attempt that lost it."""

from __future__ import annotations

from datetime import timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from orchestrator.store.tables import CompletionTask, storable, table_of, utcnow


class TaskStatus(StrEnum):
    QUEUED = "queued"
    """Waiting for a worker; `started_at` set means a previous attempt ended in "try again later", and the task
    is not claimed before `started_at + retry_after`."""
    PROCESSING = "processing"
    """Claimed by a worker, its call under way; `attempts` counts this claim. Left so by a crash until the next
    start puts it back."""
    COMPLETED = "completed"
    """Done: `result` is the engine's text, `completed_at` set. Final."""
    FAILED = "failed"
    """Done: `error` says why, `completed_at` set. Final."""


class TaskStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def add(self, task: CompletionTask) -> None:
        async with self._sessions() as s:
            s.add(task)
            await s.commit()

    async def task(self, task_id: str) -> CompletionTask | None:
        async with self._sessions() as s:
            return await s.get(CompletionTask, task_id)

    async def claim(self, limit: int, *, retry_after_s: float) -> list[CompletionTask]:
        """Up to `limit` due queued tasks, oldest first, now `processing` with one more attempt.

        One statement, `WITH picked AS (SELECT ... FOR UPDATE SKIP LOCKED) UPDATE ... FROM picked`: on PostgreSQL
        instances claiming at the same moment take different tasks, and the CTE runs once (a `LIMIT` subquery in
        `WHERE id IN (...)` may run more than once there, and claim more than `limit`); SQLite, which ignores the
        lock clause, takes its write lock for the whole statement."""
        t = table_of(CompletionTask)
        now = utcnow()
        due = or_(t.c.started_at.is_(None), t.c.started_at <= now - timedelta(seconds=retry_after_s))
        picked = (
            select(t.c.id)
            .where(t.c.status == TaskStatus.QUEUED, due)
            .order_by(t.c.created_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
            .cte("picked")
        )
        stmt = (
            update(t)
            .where(t.c.id == picked.c.id, t.c.status == TaskStatus.QUEUED)
            .values(status=TaskStatus.PROCESSING, started_at=now, attempts=t.c.attempts + 1)
            .returning(*t.c)
        )
        async with self._sessions() as s:
            rows = (await (await s.connection()).execute(stmt)).all()
            await s.commit()
        tasks = [CompletionTask(**dict(row._mapping)) for row in rows]
        return sorted(tasks, key=lambda task: task.created_at)

    async def complete(self, task: CompletionTask, result: str) -> bool:
        return await self._settle(task, status=TaskStatus.COMPLETED, result=storable(result), completed_at=utcnow())

    async def fail(self, task: CompletionTask, error: str) -> bool:
        return await self._settle(task, status=TaskStatus.FAILED, error=storable(error), completed_at=utcnow())

    async def retry_later(self, task: CompletionTask, *, counted: bool) -> bool:
        """Back to the queue, due again `retry_after_s` after this attempt started; an attempt that is not
        `counted` (no host yet, the key's rate limit) is given back."""
        attempts = task.attempts if counted else task.attempts - 1
        return await self._settle(task, status=TaskStatus.QUEUED, attempts=attempts)

    async def release(self, task: CompletionTask) -> bool:
        """Back to the queue, due at once, the attempt given back: this server stopped, the task did nothing wrong."""
        return await self._settle(task, status=TaskStatus.QUEUED, attempts=task.attempts - 1, started_at=None)

    async def _settle(self, task: CompletionTask, **values: Any) -> bool:
        """Whether the write landed (False: the task is no longer this attempt's)."""
        t = table_of(CompletionTask)
        mine: ColumnElement[bool] = and_(
            t.c.id == task.id, t.c.status == TaskStatus.PROCESSING, t.c.attempts == task.attempts
        )
        async with self._sessions() as s:
            result = await (await s.connection()).execute(update(t).where(mine).values(**values))
            await s.commit()
        return int(result.rowcount) > 0

    async def requeue_interrupted(self, max_attempts: int) -> tuple[int, int]:
        """At start: every `processing` task was interrupted by a crash. (put back, given up): a task that has
        had `max_attempts` claims fails instead, so a task that crashes the server cannot crash-loop it."""
        t = table_of(CompletionTask)
        processing = t.c.status == TaskStatus.PROCESSING
        async with self._sessions() as s:
            conn = await s.connection()
            given_up = await conn.execute(
                update(t)
                .where(processing, t.c.attempts >= max_attempts)
                .values(status=TaskStatus.FAILED, error=gave_up(max_attempts), completed_at=utcnow())
            )
            requeued = await conn.execute(update(t).where(processing).values(status=TaskStatus.QUEUED, started_at=None))
            await s.commit()
        return int(requeued.rowcount), int(given_up.rowcount)

    async def counts(self) -> dict[str, int]:
        """How many tasks are in each status (what an operator, or a test, looks at)."""
        t = table_of(CompletionTask)
        async with self._sessions() as s:
            conn = await s.connection()
            rows = (await conn.execute(select(t.c.status, func.count()).group_by(t.c.status))).all()
        return {str(status): int(n) for status, n in rows}


def gave_up(max_attempts: int) -> str:
    return f"gave up after {max_attempts} attempts"
