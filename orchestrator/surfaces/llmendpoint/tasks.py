"""LlmEndpoint's durable task queue (`/api/v1/qcompletions`): a submission admitted as the sync route admits it,
its look-up by the key that made it, and the runner that works the queue with bounded concurrency.

A task is a `completion_task` row: queued -> processing -> completed | failed (`store.tasks.TaskStatus`). The
`tasks` job claims up to `workers - running` due tasks, oldest first, and runs each as an asyncio task calling
`Completions.complete` (which charges the key only when the call succeeded). Once the job has run in this process,
a submission and a finished task claim at once too, without waiting for the next tick; a process that never runs
the job (`serve --no-scheduler`) only queues.

What an attempt's outcome does:

    the engine's text                  -> completed
    no host now, the key's rate limit  -> queued again, due `retry_after_s` later, the attempt not counted;
                                          failed with LlmEndpoint's message once the task is `host_wait_s` old
    the host failed (5xx)              -> queued again (counted); failed with its message at `max_attempts`
    any other refusal                  -> failed with its message (the engine refused, no credits, forbidden, ...)
    the key gone or disabled           -> failed "Invalid API key"
    an unexpected exception            -> logged; queued again (counted); failed at `max_attempts`

Durability: a crash leaves tasks `processing`; the next start (`recover`) puts them back, their attempt counted,
so a task that keeps crashing the server fails "gave up after N attempts" instead of crash-looping it. A clean
stop cancels the calls under way (a cancelled call is not charged) and puts their tasks back with the attempt
given back; they run again at the next start. A task's run counts toward its key's RPM like the submission did:
the rate limit paces the queue too, and a run it refuses waits like a task with no host.

Several instances: claims are `FOR UPDATE SKIP LOCKED` on PostgreSQL, so workers never share a task; `recover`
runs only where the jobs run, and assumes that instance is the only task worker (the scheduler's own rule).
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import timedelta

import structlog

from orchestrator.gateway.catalog import SERVER_ADMIN, KeyInfo
from orchestrator.gateway.flow import Gateway
from orchestrator.store.tables import CompletionTask, utcnow
from orchestrator.store.tasks import TaskStore, gave_up
from orchestrator.surfaces.llmendpoint.completions import Completions, LlmEndpointError, Refusal, Valid, parse

log = structlog.get_logger(__name__)

JOB = "tasks"
NOT_FOUND = "Task not found"
UNAUTHORIZED = "Unauthorized"
BAD_KEY = "Invalid API key"
INTERNAL = "Internal error"


@dataclass(frozen=True)
class TaskPolicy:
    workers: int
    """Tasks run at once by this process."""
    max_attempts: int
    """Claims a task may have (crashes and host failures count; a clean stop and "no host yet" do not)."""
    retry_after_s: float
    """How long a task put back by a failed attempt waits before it is claimed again."""
    host_wait_s: float
    """How long after its submission a task may keep waiting for a host (or its key's rate limit)."""
    stop_grace_s: float = 5.0
    """At a clean stop, how long the cancelled calls get to put their tasks back."""


class TaskRunner:
    def __init__(self, store: TaskStore, gateway: Gateway, policy: TaskPolicy) -> None:
        self.store = store
        self._gw = gateway
        self._completions = Completions(gateway)
        self.policy = policy
        self._lock = asyncio.Lock()  # one claim at a time: `workers - running` stays true
        self._workers: set[asyncio.Task[None]] = set()
        self._calls: set[asyncio.Future[str]] = set()
        self._filler: asyncio.Task[None] | None = None
        self._requested = False
        self._live = False  # the job has run here: this process works tasks
        self._closed = False

    # -- the API's side -----------------------------------------------------------------------

    async def submit(self, key: KeyInfo, raw: bytes) -> str:
        """Validate and admit the request as the sync route would (raises LlmEndpointError), queue it, and
        return its task id."""
        if key is SERVER_ADMIN:
            raise LlmEndpointError(
                Refusal.FORBIDDEN, UNAUTHORIZED, "the admin key owns no tasks: queue with a client key"
            )
        req = parse(raw, stream_allowed=False)
        await self._completions.admit(key, req, reserve=False)  # the refusals now; credits are reserved when it runs
        task = CompletionTask(id=str(uuid.uuid4()), key_id=key.id, model=req.model, request=req.stored())
        await self.store.add(task)
        log.info("task.queued", task_id=task.id, model=task.model)
        self._kick()
        return task.id

    async def task_of(self, key: KeyInfo, task_id: str) -> CompletionTask:
        """The task, if `key` made it (the server's admin key sees every task)."""
        try:
            uuid.UUID(task_id)  # what is not a task id is not looked up (a NUL would be a PostgreSQL error)
        except ValueError:
            raise LlmEndpointError(Refusal.NOT_FOUND, NOT_FOUND) from None
        task = await self.store.task(task_id)
        if task is None:
            raise LlmEndpointError(Refusal.NOT_FOUND, NOT_FOUND)
        if key is not SERVER_ADMIN and task.key_id != key.id:
            raise LlmEndpointError(Refusal.FORBIDDEN, UNAUTHORIZED)
        return task

    # -- the runner ---------------------------------------------------------------------------

    async def recover(self) -> None:
        """At start, before the job runs: put back what a crash left `processing`."""
        requeued, given_up = await self.store.requeue_interrupted(self.policy.max_attempts)
        if requeued or given_up:
            log.warning("tasks.recovered", requeued=requeued, given_up=given_up)

    async def run(self) -> None:
        """The job: claim what is due, as many as there are free slots."""
        self._live = True
        await self._fill()

    async def close(self) -> None:
        """Stop claiming; cancel the calls under way and let their tasks be put back (within the grace)."""
        self._closed = True
        async with self._lock:  # a claim under way spawns its workers first; they see `_closed`
            pass
        for call in list(self._calls):
            call.cancel()
        if self._workers:
            await asyncio.wait(self._workers, timeout=self.policy.stop_grace_s)

    @property
    def running(self) -> int:
        return len(self._workers)

    def _kick(self) -> None:
        """Claim now (a task was queued, or a slot freed), coalescing kicks that arrive during a claim."""
        if not self._live or self._closed:
            return
        self._requested = True
        if self._filler is None or self._filler.done():
            self._filler = asyncio.create_task(self._fill_on_request(), name="tasks-claim")

    async def _fill_on_request(self) -> None:
        structlog.contextvars.clear_contextvars()  # not the submitting request's context
        structlog.contextvars.bind_contextvars(job=JOB)
        while self._requested and not self._closed:
            self._requested = False
            try:
                await self._fill()
            except Exception:
                log.exception("tasks.claim_failed")  # the job's next tick claims again

    async def _fill(self) -> None:
        async with self._lock:
            free = self.policy.workers - len(self._workers)
            if free <= 0 or self._closed:
                return
            claimed = await self.store.claim(free, retry_after_s=self.policy.retry_after_s)
            for task in claimed:
                worker = asyncio.create_task(self._work(task), name=f"task-{task.id}")
                self._workers.add(worker)
                worker.add_done_callback(self._finished)

    def _finished(self, worker: asyncio.Task[None]) -> None:
        self._workers.discard(worker)
        self._kick()

    async def _work(self, task: CompletionTask) -> None:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(job=JOB, task_id=task.id, model=task.model, attempt=task.attempts)
        log.info("task.processing")
        try:
            await self._attempt(task)
        except Exception:
            # The row stays `processing` until the next start puts it back.
            log.exception("task.settle_failed")

    async def _attempt(self, task: CompletionTask) -> None:
        ready = await self._ready(task)
        if ready is None:
            return
        if self._closed:  # spawned by the last claim before a stop
            await self.store.release(task)
            return
        call = asyncio.ensure_future(self._completions.complete(*ready))
        self._calls.add(call)
        try:
            text = await call
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this worker itself is cancelled, not only its call
            await self.store.release(task)
            log.info("task.released", reason="server stopping")
            return
        except LlmEndpointError as e:
            await self._after_error(task, e)
            return
        except Exception:
            log.exception("task.attempt_crashed")
            await self._retry_or_fail(task, INTERNAL)
            return
        finally:
            self._calls.discard(call)
        if await self.store.complete(task, text):
            log.info("task.completed")

    async def _ready(self, task: CompletionTask) -> tuple[KeyInfo, Valid] | None:
        """The task's key and request, or None when the task failed without a call."""
        if task.attempts > self.policy.max_attempts:
            await self._fail(task, gave_up(self.policy.max_attempts))
            return None
        key = self._gw.catalog.keys_by_id.get(task.key_id)
        if key is None:  # the row exists (the task would be gone with it): made since this instance last loaded keys
            await self._gw.catalog.reload()
            key = self._gw.catalog.keys_by_id.get(task.key_id)
        if key is None or not key.enabled:
            await self._fail(task, BAD_KEY)
            return None
        try:
            return key, parse(task.request.encode(), stream_allowed=False)
        except LlmEndpointError as e:
            await self._fail(task, e.message, e.detail)
            return None

    async def _after_error(self, task: CompletionTask, e: LlmEndpointError) -> None:
        if e.refusal in (Refusal.RATE_LIMITED, Refusal.NO_HOST):
            if task.created_at <= utcnow() - timedelta(seconds=self.policy.host_wait_s):
                await self._fail(task, e.message)
            elif await self.store.retry_later(task, counted=False):
                log.info("task.waiting", reason=e.message, detail=e.detail)
        elif e.refusal is Refusal.HOST_FAILED:
            await self._retry_or_fail(task, e.message, e.detail)
        else:
            await self._fail(task, e.message, e.detail)

    async def _retry_or_fail(self, task: CompletionTask, error: str, detail: str | None = None) -> None:
        if task.attempts >= self.policy.max_attempts:
            await self._fail(task, error, detail)
        elif await self.store.retry_later(task, counted=True):
            log.warning("task.retrying", error=error, detail=detail)

    async def _fail(self, task: CompletionTask, error: str, detail: str | None = None) -> None:
        if await self.store.fail(task, error):
            log.warning("task.failed", error=error, detail=detail)

    async def idle(self) -> None:
        """Until no task runs here and no claim is under way (tests wait on this instead of sleeping)."""
        while self._workers or (self._filler is not None and not self._filler.done()):
            await asyncio.wait([*self._workers, *([self._filler] if self._filler else [])])
