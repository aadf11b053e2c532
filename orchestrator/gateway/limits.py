"""Rate limits: a sliding-window requests-per-minute counter per API key, a token bucket per replica, and the gate
of an external endpoint (at most so many calls at once, started so far apart); the window and the gate in memory, or
counted over every instance (`ORCH_REDIS_URL`)."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from orchestrator.platform.redis_flight import FULL, SharedFlight
from orchestrator.platform.redis_limits import SharedLimits

GATE_POLL_S = 0.02
"""How often a gate with calls waiting tries the shared store again (a slot freed on another instance)."""


@dataclass(slots=True)
class _Window:
    start: float
    current: int = 0
    previous: int = 0


@dataclass
class RpmLimiter:
    """Sliding window from two fixed minutes: the previous minute's count weighs by how much of it still
    overlaps the last 60 s. Smooth at minute boundaries, O(1) memory per key."""

    clock: Callable[[], float] = time.monotonic
    _windows: dict[int, _Window] = field(default_factory=dict)

    def allow(self, key_id: int, rpm: int) -> bool:
        now = self.clock()
        w = self._windows.get(key_id)
        if w is None:
            w = self._windows[key_id] = _Window(start=now)
        elapsed = now - w.start
        if elapsed >= 120:
            w.start, w.current, w.previous = now, 0, 0
        elif elapsed >= 60:
            w.start, w.previous, w.current = w.start + 60, w.current, 0
            elapsed -= 60
        estimate = w.previous * (1 - elapsed / 60) + w.current
        if estimate >= rpm:
            return False
        w.current += 1
        return True

    async def allow_async(self, key_id: int, rpm: int) -> bool:
        """`allow`, for a caller on the event loop (a shared window's round trip does not block it)."""
        return self.allow(key_id, rpm)


class SharedRpmLimiter(RpmLimiter):
    """The same window, counted for every instance at once in a shared store (`ORCH_REDIS_URL`); while the store is
    out of reach, this instance's own window (of its own calls) decides."""

    def __init__(self, shared: SharedLimits, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)
        self.shared = shared

    def allow(self, key_id: int, rpm: int) -> bool:
        return self._decided(self.shared.allow_rpm(key_id, rpm), key_id, rpm)

    async def allow_async(self, key_id: int, rpm: int) -> bool:
        return self._decided(await self.shared.allow_rpm_async(key_id, rpm), key_id, rpm)

    def _decided(self, allowed: bool | None, key_id: int, rpm: int) -> bool:
        if allowed is None:
            return super().allow(key_id, rpm)
        if allowed:  # counted here too, so that an outage goes on from this instance's own calls, not from zero
            super().allow(key_id, rpm)
        return allowed


@dataclass(slots=True)
class TokenBucket:
    """`rate` requests per second with a burst of `rate`."""

    rate: float
    tokens: float = 0.0
    stamp: float = 0.0

    def __post_init__(self) -> None:
        self.tokens = self.rate

    def has_token(self, now: float) -> bool:
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return self.tokens >= 1

    def take(self) -> None:
        self.tokens -= 1


class Gate:
    """An external endpoint's limits: at most `concurrency` calls at once (a semaphore), each started at least
    1/`per_second` s after the previous one (a spacing, not a burst). 0 means no limit. Calls wait, in order."""

    def __init__(self, concurrency: int, per_second: int) -> None:
        self.concurrency = concurrency
        self.per_second = per_second
        self._slots = asyncio.Semaphore(concurrency) if concurrency else None
        self._spacing = 1.0 / per_second if per_second else 0.0
        self._next_start = 0.0

    async def enter(self) -> None:
        """Wait for a slot and for the call's start time; the caller calls `leave` once done (not if cancelled)."""
        if self._slots is not None:
            await self._slots.acquire()
        if not self._spacing:
            return
        try:
            now = time.monotonic()
            start = max(now, self._next_start)
            self._next_start = start + self._spacing
            if start > now:
                await asyncio.sleep(start - now)
        except BaseException:
            self.leave()
            raise

    def leave(self) -> None:
        if self._slots is not None:
            self._slots.release()


class SharedGate(Gate):
    """The same gate over every instance (`ORCH_REDIS_URL`): a call takes a slot when the calls inside on every
    instance are fewer than `concurrency`, and its start is spaced from the last start on any instance. A call that
    finds no slot waits in this instance's line, tried again whenever a call here leaves and every GATE_POLL_S while
    any waits (a slot freed on another instance is noticed by the poll: no subscription to keep, nothing lost when
    Redis restarts, and nothing sent while nobody waits). While the store is out of reach, this instance's own calls
    inside and its own spacing decide."""

    def __init__(self, concurrency: int, per_second: int, shared: SharedFlight, name: str) -> None:
        super().__init__(concurrency, per_second)
        self._shared = shared
        self._name = name
        self._line: deque[asyncio.Future[float]] = deque()
        self._poller: asyncio.Task[None] | None = None

    async def enter(self) -> None:
        delay = self._try() if not self._line else None
        if delay is None:
            turn = asyncio.get_running_loop().create_future()
            self._line.append(turn)
            self._poll()
            try:
                delay = await turn
            except BaseException:
                if turn.done() and not turn.cancelled():  # let in, then cancelled: the slot goes to the next
                    self.leave()
                raise
        if delay > 0:
            try:
                await asyncio.sleep(delay)
            except BaseException:
                self.leave()
                raise

    def leave(self) -> None:
        self._shared.left_slot(self._name)
        self._admit()

    def _try(self) -> float | None:
        """Let a call in now if it may: the seconds until its start, or None (no slot)."""
        answer = self._shared.take_slot(self._name, self.concurrency, self._spacing)
        if answer is None:  # the store is out of reach: this instance's calls alone
            if self.concurrency and self._shared.inside(self._name) >= self.concurrency:
                return None
            self._shared.took_slot(self._name)
            now = time.monotonic()
            start = max(now, self._next_start)
            self._next_start = start + self._spacing
            return start - now
        return None if answer == FULL else answer

    def _admit(self) -> None:
        while self._line:
            turn = self._line[0]
            if turn.done():  # cancelled while waiting
                self._line.popleft()
                continue
            delay = self._try()
            if delay is None:
                return
            self._line.popleft()
            turn.set_result(delay)

    def _poll(self) -> None:
        if self._poller is None or self._poller.done():
            loop = asyncio.get_running_loop()  # a context of its own: it polls for every waiter, not one request
            self._poller = loop.create_task(self._polling(), name=f"gate-{self._name}", context=contextvars.Context())

    async def _polling(self) -> None:
        while any(not turn.done() for turn in self._line):
            await asyncio.sleep(GATE_POLL_S)
            self._admit()
