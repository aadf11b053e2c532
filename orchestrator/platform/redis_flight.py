"""Calls in flight counted over every instance and worker in Redis (`ORCH_REDIS_URL`): how many calls each routing
target (a replica, an external endpoint) has under way, which the priority queue's room and a replica's drain read;
and an external endpoint's gate, whose slots (`max_concurrency`) and start times (`max_calls_per_second`) are taken
over every instance at once.

Each instance writes its own count of each target as a field of the target's hash named after the instance, and
writes it whole (never an increment): a write lost while Redis was out of reach is made right by the next one. A
field whose instance's liveness key (kept alive by `RedisLimits`) has expired is dropped by the next read, so the
calls of a killed instance stop counting within the liveness TTL, and its gate slots are free again.

In-flight counts are written at most every WRITE_EVERY_S, for every target whose count changed, in one batch on the
event loop's pipe after the calls that changed them have gone on: never on a call's own path nor blocking the loop,
and a few hundred round trips a second at most however many calls a process serves (the others see a count that much
later). A gate's slot is taken on the
call's path (one script: a slot if the calls inside on every instance are fewer than the limit, and the start time
after the last one taken); a slot given back is written with the in-flight counts.

While Redis cannot be reached, every read answers None and the callers count this instance's calls alone (the outage
is logged once, by `RedisLimits`); the counts not written are written once it answers again.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import Counter
from typing import Any, Protocol

from orchestrator.platform.redis_limits import RedisLimits, Script

WRITE_EVERY_S = 0.005
"""How long changed in-flight counts wait to be written together."""

RETRY_S = 1.0
"""How soon counts that could not be written are tried again when nothing else changes."""

FULL = -1.0
"""`take_slot`'s answer when every slot of the gate is taken."""

_WRITE = Script("""
if tonumber(ARGV[2]) > 0 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('SET', ARGV[3] .. ARGV[1], 1, 'PX', ARGV[4])
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return 1
""")
"""This instance's count of a target, written whole (0: its field removed), its liveness key set with it (the
liveness thread's first beat may come later, and a count of a dead instance is dropped)."""

_OTHERS = Script("""
local n = 0
local f = redis.call('HGETALL', KEYS[1])
for i = 1, #f, 2 do
  if f[i] ~= ARGV[1] then
    if redis.call('EXISTS', ARGV[2] .. f[i]) == 1 then
      n = n + tonumber(f[i + 1])
    else
      redis.call('HDEL', KEYS[1], f[i])
    end
  end
end
return n
""")
"""The counts of every other live instance (a dead one's field is dropped)."""

_SLOT = Script("""
local me, mine, limit, alive = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
if limit > 0 then
  local n = mine
  local f = redis.call('HGETALL', KEYS[1])
  for i = 1, #f, 2 do
    if f[i] ~= me then
      if redis.call('EXISTS', alive .. f[i]) == 1 then
        n = n + tonumber(f[i + 1])
      else
        redis.call('HDEL', KEYS[1], f[i])
      end
    end
  end
  if n > limit then return -1 end
  redis.call('HSET', KEYS[1], me, ARGV[2])
  redis.call('SET', alive .. me, 1, 'PX', ARGV[7])
end
local spacing = tonumber(ARGV[5])
if spacing <= 0 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local start = math.max(now, tonumber(redis.call('GET', ARGV[6]) or '0'))
redis.call('SET', ARGV[6], string.format('%d', start + spacing), 'PX', math.floor(spacing / 1000) + 1000)
return start - now
""")
"""A gate's slot, if this instance's calls inside once this one is in (`mine`) and every other live instance's are
at most `limit` (0: no limit); then the call's start, `spacing` microseconds after the last start taken (on Redis's
clock). Answers the microseconds to wait before starting, or -1 for no slot."""


class SharedFlight(Protocol):
    """What the catalog, the gates and the priority queue need of a shared count of calls (a fake in unit tests)."""

    def started(self, target: str) -> None: ...

    def ended(self, target: str) -> None: ...

    def mine(self, target: str) -> int: ...

    def others(self, targets: list[str]) -> list[int] | None: ...

    def take_slot(self, gate: str, limit: int, spacing_s: float) -> float | None: ...

    def took_slot(self, gate: str) -> None: ...

    def left_slot(self, gate: str) -> None: ...

    def inside(self, gate: str) -> int: ...


class RedisFlight:
    """`SharedFlight` in Redis, on `RedisLimits`' connection, liveness key and outage rules (so, from the event loop's
    thread only)."""

    def __init__(self, limits: RedisLimits) -> None:
        self._limits = limits
        self._calls: Counter[str] = Counter()
        """This instance's calls in flight per target."""
        self._inside: Counter[str] = Counter()
        """This instance's calls inside each gate."""
        self._dirty: set[str] = set()
        """Redis keys whose count (this instance's) changed since it was last written."""
        self._flushing: asyncio.Handle | None = None
        self._writing: asyncio.Task[None] | None = None
        """The last write of counts under way (kept referenced until done)."""

    def started(self, target: str) -> None:
        self._calls[target] += 1
        self._changed(f"flight:{target}")

    def ended(self, target: str) -> None:
        self._calls[target] -= 1
        self._changed(f"flight:{target}")

    def mine(self, target: str) -> int:
        return self._calls[target]

    def others(self, targets: list[str]) -> list[int] | None:
        """The calls in flight on each target at every other live instance, in one round trip; None: unknown."""
        if not targets:
            return []
        self._limits.keep_alive()
        alive, me = self._limits.alive_prefix, self._limits.instance
        return self._limits.run(_OTHERS, [(self._limits.key(f"flight:{t}"), me, alive) for t in targets])

    def take_slot(self, gate: str, limit: int, spacing_s: float) -> float | None:
        """Take a slot of the gate (`limit` calls inside over every instance, 0: any number) and a start time
        `spacing_s` after the last one: the seconds to wait before starting, FULL, or None (Redis out of reach: the
        caller decides alone, and calls `took_slot` if it lets the call in)."""
        self._limits.keep_alive()
        spacing_us = round(spacing_s * 1_000_000)
        call = (
            self._limits.key(f"gate:{gate}"),
            self._limits.instance,
            self._inside[gate] + 1,
            limit,
            self._limits.alive_prefix,
            spacing_us,
            self._limits.key(f"start:{gate}"),
            self._limits.alive_ttl_ms,
        )
        answers = self._limits.run(_SLOT, [call])
        if answers is None:
            return None
        if answers[0] < 0:
            return FULL
        self._inside[gate] += 1
        return answers[0] / 1_000_000

    def took_slot(self, gate: str) -> None:
        """A slot the caller gave without Redis: counted here, and written once Redis answers."""
        self._inside[gate] += 1
        self._changed(f"gate:{gate}")

    def left_slot(self, gate: str) -> None:
        self._inside[gate] -= 1
        self._changed(f"gate:{gate}")

    def inside(self, gate: str) -> int:
        return self._inside[gate]

    def _changed(self, key: str) -> None:
        self._dirty.add(key)
        if self._flushing is None:
            try:
                # A context of its own: what it logs (an outage) is no request's.
                loop = asyncio.get_running_loop()
                self._flushing = loop.call_later(WRITE_EVERY_S, self._flush, context=contextvars.Context())
            except RuntimeError:  # no loop (a caller outside one): written now
                self._flush()

    def _count(self, key: str) -> int:
        kind, _, name = key.partition(":")
        return max(0, (self._calls if kind == "flight" else self._inside)[name])

    def _flush(self) -> None:
        """Write every changed count whole, in one round trip; kept for a retry if Redis cannot be reached."""
        self._flushing = None
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        self._limits.keep_alive()
        me, alive, ttl_ms = self._limits.instance, self._limits.alive_prefix, self._limits.alive_ttl_ms
        calls = [(self._limits.key(k), me, self._count(k), alive, ttl_ms) for k in dirty]
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a caller outside one): written now, and the next change retries a failure
            if self._limits.run(_WRITE, calls) is None:
                self._dirty |= dirty
        else:  # on the loop's pipe: the loop goes on serving while the counts are written
            self._writing = loop.create_task(self._write(dirty, calls), context=contextvars.Context())
        for counts in (self._calls, self._inside):
            for name in [n for n, c in counts.items() if c <= 0]:
                del counts[name]

    async def _write(self, dirty: set[str], calls: list[tuple[Any, ...]]) -> None:
        answers = await asyncio.gather(*(self._limits.run_async(_WRITE, call) for call in calls))
        failed = {key for key, answer in zip(dirty, answers, strict=True) if answer is None}
        if failed:  # written whole at the next change, or after RETRY_S if none comes
            self._dirty |= failed
            if self._flushing is None:
                loop = asyncio.get_running_loop()
                self._flushing = loop.call_later(RETRY_S, self._flush, context=contextvars.Context())
