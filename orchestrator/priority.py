"""The priority queue of `/queue/chat/completions`: per model, requests wait until they are first in line (lowest
`priority` first, then first come) and a replica of the model has room, or until their timeout.

A replica has room while it runs fewer than `slots` calls (an llm_endpoint: fewer than its max_concurrency, when it
has one). Every finished call and every catalog reload lets the next waiters through. Waiting happens on futures,
never by polling.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from dataclasses import dataclass, field

from orchestrator.catalog import Catalog, Target
from orchestrator.gateway import GatewayError, NoReplica


class QueueTimeout(GatewayError):
    def __init__(self, model: str, waited_s: float) -> None:
        super().__init__(f"Request timed out after {waited_s:g}s waiting in the queue for model {model}.")


@dataclass(order=True, slots=True)
class _Waiter:
    priority: int
    seq: int
    turn: asyncio.Future[None] = field(compare=False)


class PriorityQueues:
    def __init__(self, catalog: Catalog, *, slots: int, timeout_s: float) -> None:
        self._catalog = catalog
        self._slots = slots
        self._timeout_s = timeout_s
        self._lines: dict[str, list[_Waiter]] = {}
        self._admitted: dict[str, int] = {}
        """Let through, and not yet counted in a replica's in-flight calls."""
        self._seq = itertools.count()

    def waiting(self, model: str) -> int:
        return sum(1 for w in self._lines.get(model, ()) if not w.turn.done())

    def _capacity(self, target: Target) -> int:
        if target.gate is not None and target.gate.concurrency:
            return target.gate.concurrency
        return self._slots

    def _room(self, model: str) -> int:
        now = time.monotonic()
        free = sum(
            max(0, self._capacity(t) - t.inflight) for t in self._catalog.pools.get(model, ()) if t.available(now)
        )
        return free - self._admitted.get(model, 0)

    async def wait_turn(self, model: str, priority: int, timeout_s: float | None = None) -> None:
        """Return once the request may be sent; the caller calls `sent(model)` right after opening its call.

        `timeout_s` shortens the queue's own timeout, never lengthens it."""
        timeout_s = self._timeout_s if timeout_s is None else min(timeout_s, self._timeout_s)
        if not self._catalog.pools.get(model):
            raise NoReplica(model)
        if not self.waiting(model) and self._room(model) > 0:
            self._admitted[model] = self._admitted.get(model, 0) + 1
            return
        waiter = _Waiter(priority, next(self._seq), asyncio.get_running_loop().create_future())
        heapq.heappush(self._lines.setdefault(model, []), waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.turn), timeout_s)
        except TimeoutError:
            waiter.turn.cancel()
            raise QueueTimeout(model, timeout_s) from None
        except asyncio.CancelledError:  # the client went away; if it was let through meanwhile, pass its turn on
            if waiter.turn.done() and not waiter.turn.cancelled():
                self.sent(model)
            else:
                waiter.turn.cancel()
            raise

    def sent(self, model: str) -> None:
        """A request let through has opened its call (or given up): it now counts as in flight, or not at all."""
        self._admitted[model] -= 1
        self.wake(model)

    def wake(self, model: str) -> None:
        """Let the first waiters through while the model has room."""
        line = self._lines.get(model)
        if not line:
            return
        room = self._room(model)
        while line and room > 0:
            waiter = heapq.heappop(line)
            if waiter.turn.done():  # timed out or abandoned
                continue
            waiter.turn.set_result(None)
            self._admitted[model] = self._admitted.get(model, 0) + 1
            room -= 1
        if not line:
            del self._lines[model]

    def wake_all(self) -> None:
        for model in list(self._lines):
            self.wake(model)
