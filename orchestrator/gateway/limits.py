"""In-memory rate limits: a sliding-window requests-per-minute counter per API key, a token bucket per replica,
and the gate of an external endpoint (at most so many calls at once, started so far apart)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from orchestrator.platform.redis_limits import SharedLimits


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


class SharedRpmLimiter(RpmLimiter):
    """The same window, counted for every instance at once in a shared store (`ORCH_REDIS_URL`); while the store is
    out of reach, this instance's own window (of its own calls) decides."""

    def __init__(self, shared: SharedLimits, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)
        self.shared = shared

    def allow(self, key_id: int, rpm: int) -> bool:
        allowed = self.shared.allow_rpm(key_id, rpm)
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
