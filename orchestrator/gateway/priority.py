"""The priority queue of `/queue/chat/completions`: per model, requests wait until they are first in line (lowest
`priority` first, then first come) and a replica of the model has room, or until their timeout.

A replica has room while it runs fewer than `slots` calls (an llm_endpoint: fewer than its max_concurrency, when it
has one). A request let through is `admitted` until the gateway picks its replica (then it counts in that replica's
in-flight calls instead). Waiters are woken by every finished call, every admission that ends, every arrival, and
every catalog reload (at least every ORCH_CATALOG_REFRESH_INTERVAL_S, which is when a replica back from an ejection
or a refilled rate bucket is noticed); they wait on futures.

With a shared count of calls (`ORCH_REDIS_URL`), a replica's room counts its calls in flight at every instance, so
the queue lets a call through only when the replica has room over all of them; a call ending on another instance is
noticed by a poll every POLL_S while anyone waits here (no subscription to keep, and nothing sent while nobody
waits). Calls let through and not yet picked are counted by their own instance only: they are picked at once.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import time
from dataclasses import dataclass, field

from orchestrator.gateway.catalog import Catalog, Target
from orchestrator.gateway.flow import GatewayError, NoReplica

POLL_S = 0.05
"""With a shared count: how often waiters look for room freed at another instance."""


class QueueTimeout(GatewayError):
    def __init__(self, model: str, waited_s: float) -> None:
        super().__init__(f"Request timed out after {waited_s:g}s waiting in the queue for model {model}.")


@dataclass(order=True, slots=True)
class _Waiter:
    priority: int
    seq: int
    turn: asyncio.Future[None] = field(compare=False)


@dataclass(slots=True)
class _Line:
    heap: list[_Waiter] = field(default_factory=list)
    live: int = 0
    """Waiters in `heap` still waiting (the others timed out or left, and are dropped when they surface)."""


class PriorityQueues:
    def __init__(self, catalog: Catalog, *, slots: int, timeout_s: float) -> None:
        self._catalog = catalog
        self._slots = slots
        self._timeout_s = timeout_s
        self._lines: dict[str, _Line] = {}
        self._admitted: dict[str, int] = {}
        """Let through, and not yet counted in a replica's in-flight calls."""
        self._seq = itertools.count()
        self._poller: asyncio.Task[None] | None = None

    def waiting(self, model: str) -> int:
        line = self._lines.get(model)
        return line.live if line is not None else 0

    def _capacity(self, target: Target) -> int:
        if target.gate is not None and target.gate.concurrency:
            return target.gate.concurrency
        return self._slots

    def _room(self, model: str) -> int:
        now = time.monotonic()
        if self._catalog.flight is None:
            free = sum(
                max(0, self._capacity(t) - t.inflight) for t in self._catalog.pools.get(model, ()) if t.available(now)
            )
        else:
            targets = [t for t in self._catalog.pools.get(model, ()) if t.available(now)]
            counts = self._catalog.in_flight(targets)
            free = sum(max(0, self._capacity(t) - n) for t, n in zip(targets, counts, strict=True))
        return free - self._admitted.get(model, 0)

    def _poll(self) -> None:
        """With a shared count, look for room every POLL_S while anyone waits (a call ended at another instance)."""
        if self._catalog.flight is not None and (self._poller is None or self._poller.done()):
            loop = asyncio.get_running_loop()  # a context of its own: it polls for every waiter, not one request
            self._poller = loop.create_task(self._polling(), name="priority-poll", context=contextvars.Context())

    async def _polling(self) -> None:
        while any(line.live for line in self._lines.values()):
            await asyncio.sleep(POLL_S)
            self.wake_all()

    async def wait_turn(self, model: str, priority: int, timeout_s: float | None = None) -> None:
        """Return once the request may be sent; the caller then calls `sent(model)` exactly once, as soon as its
        replica is picked (or the call fails before that).

        `timeout_s` shortens the queue's own timeout, never lengthens it."""
        if not self._catalog.pools.get(model):
            self._catalog.unserved(model)
            if model not in self._catalog.waking:
                raise NoReplica(model)
            # A deployment at zero: the call waits while the autoscaler starts a replica (it counts this one too).
        timeout_s = self._timeout_s if timeout_s is None else min(timeout_s, self._timeout_s)
        line = self._lines.setdefault(model, _Line())
        waiter = _Waiter(priority, next(self._seq), asyncio.get_running_loop().create_future())
        heapq.heappush(line.heap, waiter)
        line.live += 1
        self.wake(model)  # room now, and nobody ahead: let through at once
        if not waiter.turn.done():
            self._poll()
        try:
            async with asyncio.timeout(timeout_s):
                await waiter.turn
        except (TimeoutError, asyncio.CancelledError) as e:
            if waiter.turn.done() and not waiter.turn.cancelled():
                if isinstance(e, TimeoutError):  # let through in the same instant: take the turn after all
                    return
                self.sent(model)  # let through, then abandoned: pass the turn on
            else:
                waiter.turn.cancel()
                line.live -= 1
            if isinstance(e, TimeoutError):
                if not self._catalog.pools.get(model):  # no replica started in time: 503 and Retry-After
                    raise NoReplica(model) from None
                raise QueueTimeout(model, timeout_s) from None
            raise

    def sent(self, model: str) -> None:
        """A request let through has its replica (it now counts in flight there), or gave up."""
        self._admitted[model] -= 1
        self.wake(model)

    def wake(self, model: str) -> None:
        """Let the first waiters through while the model has room."""
        line = self._lines.get(model)
        if line is None:
            return
        room = self._room(model) if line.live else 0
        while line.heap and room > 0:
            waiter = heapq.heappop(line.heap)
            if waiter.turn.done():  # timed out or abandoned
                continue
            waiter.turn.set_result(None)
            line.live -= 1
            self._admitted[model] = self._admitted.get(model, 0) + 1
            room -= 1
        if len(line.heap) > 2 * line.live + 16:  # mostly abandoned entries: drop them
            line.heap = [w for w in line.heap if not w.turn.done()]
            heapq.heapify(line.heap)
        if not line.heap:
            del self._lines[model]

    def wake_all(self) -> None:
        for model in list(self._lines):
            self.wake(model)
