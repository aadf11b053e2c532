"""Limits every instance and worker shares through Redis (`ORCH_REDIS_URL`): each key's requests-per-minute window,
the spend a metered key has held for its calls in flight, the LlmEndpoint credits taken for calls in flight, and
which instances have calls of a key in flight or not yet written (a key being deleted asks). Each check is one Lua
script: one round trip, atomic over every instance.

The gateway's own calls check their rate limit and hold their spend without blocking the event loop
(`allow_rpm_async`, `reserve_async`, over `RedisPipe`: the checks of concurrent calls share round trips). What only
gives back or adds an amount nobody waits to read (a hold ended, a call's fee) is summed per key over the loop's turn
and sent with the next batch, its answer unread. The other surfaces' checks, and the records' and liveness writes,
block for their round trip on a connection of their own, bounded by a short socket timeout. A Redis that cannot be
reached is never an error to a caller: each method answers None ("not shared right now"), the caller falls back to its
own in-memory limits, and the outage is logged once (`redis.unreachable`) with its end (`redis.reachable`); Redis is
tried again every `retry_after_s` meanwhile, not on every call.

Holds, credits and busy marks die with their instance: each instance keeps a liveness key alive from a thread of its
own, and an entry whose instance's liveness key has expired is dropped by the next check of its key. Written fees are
counted under a name that carries its own expiry.

An outage leaves an instance's counts in Redis wrong: what it gave back meanwhile was dropped, and a command whose
answer never came may have run, or may still run when a stalled Redis resumes. So the first command after one puts
them right (`_SYNC`): each count this instance ever wrote is set to what its ledger says it holds, under a new epoch
of this instance; every command that changes a count carries the epoch it was sent in, and one from an older epoch
that runs after the resync changes nothing (it is fenced).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import hiredis
import structlog

from orchestrator.platform.redis_pipe import PipeBroken, RedisPipe, connection_args

if TYPE_CHECKING:
    import redis

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script, sent by its SHA (and whole only to a Redis that has not seen it)."""

    text: str
    keys: int = 1
    """How many of a call's first values are Redis keys (the rest are its arguments)."""
    fenced: bool = False
    """Changes this instance's counts: its sender adds its fence key and epoch as the last two arguments, and the
    script (`_FENCE`) changes nothing when a resync has run since."""
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.text.encode()).hexdigest())  # noqa: S324 (Redis's name)


_RPM = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local w = redis.call('HMGET', KEYS[1], 's', 'c', 'p')
local start, current, previous = tonumber(w[1]), tonumber(w[2]) or 0, tonumber(w[3]) or 0
if not start then start = now end
local elapsed = now - start
if elapsed >= 120 then
  start, current, previous, elapsed = now, 0, 0, 0
elseif elapsed >= 60 then
  start, previous, current, elapsed = start + 60, current, 0, elapsed - 60
end
local allowed = previous * (1 - elapsed / 60) + current < tonumber(ARGV[1])
if allowed then current = current + 1 end
redis.call('HSET', KEYS[1], 's', string.format('%.6f', start), 'c', current, 'p', previous)
redis.call('PEXPIRE', KEYS[1], 120000)
return allowed and 1 or 0
""")
"""`RpmLimiter`'s sliding window (orchestrator.gateway.limits), on Redis's clock so that every instance agrees."""

_NOW_MS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""
"""Redis's clock, in milliseconds."""

_FENCE = """
local function fenced()
  local current = redis.call('GET', ARGV[#ARGV - 1])
  return current and tonumber(current) > tonumber(ARGV[#ARGV])
end
"""
"""Whether this command was sent before the instance's last resync (its fence key, then its epoch, end ARGV): it ran
late, on a connection given up for lost, and what it would change was set since."""

_LIVE = (
    _NOW_MS
    + _FENCE
    + """
local function live(key, me, alive, now)
  local sum = 0
  local entries = redis.call('HGETALL', key)
  for i = 1, #entries, 2 do
    local owner = entries[i]
    local counted = owner == me
    if not counted then
      local expires = tonumber(string.match(owner, '^w:(%d+):'))
      if expires then
        counted = expires > now
      else
        counted = redis.call('EXISTS', alive .. owner) == 1
      end
    end
    if counted then
      sum = sum + tonumber(entries[i + 1])
    else
      redis.call('HDEL', key, owner)
    end
  end
  return sum
end
"""
)
"""The sum of a hash's amounts whose owner is alive, the dead dropped: an instance lives while its liveness key does;
a batch of written fees (`w:<expiry in ms on Redis's clock>:<batch>`) until its expiry, with no key to look up."""

_RESERVE = Script(
    _LIVE
    + """
local me, worst, budget, alive = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
if fenced() then return -1 end
local now = now_ms()
if live(KEYS[1], me, alive, now) + live(KEYS[2], me, alive, now) + worst > budget then return 0 end
redis.call('HINCRBY', KEYS[1], me, ARGV[2])
redis.call('SET', alive .. me, 1, 'PX', ARGV[5])
return 1
""",
    keys=2,
    fenced=True,
)
"""Hold `worst` if every live instance's holds of the key (KEYS[1]) and the credits they took of it (KEYS[2]), plus
`worst`, fit in `budget`. The sums are Lua's doubles (exact to $9,000 in units of 10^-12 $, within a millionth of a
cent beyond); the holds themselves are Redis's 64-bit integers, added and taken back exactly."""

_CREDITS = Script(
    _LIVE
    + """
local me, price, balance, quota, alive = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
if fenced() then return -1 end
local now = now_ms()
local past_quota = live(KEYS[2], me, alive, now) - quota
if past_quota < 0 then past_quota = 0 end
if live(KEYS[1], me, alive, now) + past_quota + price > balance then return 0 end
redis.call('HINCRBY', KEYS[1], me, ARGV[2])
redis.call('SET', alive .. me, 1, 'PX', ARGV[6])
return 1
""",
    keys=2,
    fenced=True,
)
"""Take `price` credits (KEYS[1]) if they fit in the balance after the credits every live instance took and the part
of a metered key's holds and fees (KEYS[2]) past what is left of its month's quota: credits come off the balance
alone, fees off the quota first. With `_RESERVE`, a key's holds, fees and credits together never exceed its quota
and balance, nor its credits its balance."""

_BUSY = Script("""
redis.call('HSET', KEYS[1], ARGV[1], 1)
redis.call('SET', ARGV[2] .. ARGV[1], 1, 'PX', ARGV[3])
return 1
""")
"""This instance has calls of the key in flight or not yet written."""

_IDLE = Script("""
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
""")

_BUSY_ELSEWHERE = Script("""
local busy = 0
for _, owner in ipairs(redis.call('HKEYS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[2] .. owner) == 0 then
    redis.call('HDEL', KEYS[1], owner)
  elseif owner ~= ARGV[1] then
    busy = busy + 1
  end
end
return busy
""")
"""How many other live instances have calls of the key in flight or not yet written (the dead are dropped)."""

_WRITTEN = Script(
    _NOW_MS
    + _FENCE
    + """
if not fenced() and redis.call('HINCRBY', KEYS[1], ARGV[1], '-' .. ARGV[2]) == 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
redis.call('HINCRBY', KEYS[1], 'w:' .. string.format('%d', now_ms() + tonumber(ARGV[4])) .. ':' .. ARGV[3], ARGV[2])
return 1
""",
    fenced=True,
)
"""Fees written to the database: no longer this instance's, they are counted under a name of their own until every
instance has read the accounts again (`written_ttl_s`), since until then another may not know of them. This
instance's count may go below zero for a moment (its fees were added on the pipe, which another connection's command
may overtake): the addition then brings it back. Fenced, the fees are still counted as written: a resync set this
instance's count without them."""

_ADJUST = Script(
    _FENCE
    + """
if fenced() then return -1 end
if redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2]) <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
redis.call('SET', ARGV[3] .. ARGV[1], 1, 'PX', ARGV[4])
return 1
""",
    fenced=True,
)
"""Add `amount` (negative: give back) to this instance's count: holds given back and fees held until written, never
refused, so never checked."""

_SYNC = Script("""
local me, epoch, alive, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local current = redis.call('GET', KEYS[1])
if current and tonumber(current) >= tonumber(epoch) then return 0 end
redis.call('SET', KEYS[1], epoch, 'PX', ttl)
for i = 5, #ARGV, 2 do
  if tonumber(ARGV[i + 1]) > 0 then
    redis.call('HSET', ARGV[i], me, ARGV[i + 1])
  else
    redis.call('HDEL', ARGV[i], me)
  end
end
redis.call('SET', alive .. me, 1, 'PX', ttl)
return 1
""")
"""Set this instance's count in each given hash (after ARGV's first four: the hash, then the amount) to the amount,
and its fence (KEYS[1]) to the new epoch: what an older command would change from now on stays as set here. An older
resync that runs late (sent on a connection given up for lost while Redis was stalled) changes nothing."""

_SYNC_BATCH = 500
"""Counts set per `_SYNC` command (an instance that served many keys sends several, in one round trip)."""

Pool = Literal["holds", "credits"]
"""A key's amounts counted per instance: a metered key's holds and unwritten fees, or LlmEndpoint credits taken."""

Counts = Callable[[], dict[tuple[Pool, int], int]]
"""What an instance holds in the shared store by pool and key, as its ledger knows it."""


class SharedLimits(Protocol):
    """What the gateway's limiter and the ledger need of a shared store (a fake in unit tests)."""

    def allow_rpm(self, key_id: int, rpm: int) -> bool | None: ...

    async def allow_rpm_async(self, key_id: int, rpm: int) -> bool | None: ...

    def reserve(self, key_id: int, worst: int, budget: int) -> bool | None: ...

    async def reserve_async(self, key_id: int, worst: int, budget: int) -> bool | None: ...

    def take_credits(self, key_id: int, price: int, balance: int, quota_left: int) -> bool | None: ...

    def unreserve(self, key_id: int, amount: int, *, pool: Pool = "holds") -> None: ...

    def hold_fee(self, key_id: int, fee: int) -> None: ...

    def written(self, amounts: dict[int, int], *, pool: Pool = "holds") -> None: ...

    def mark_busy(self, key_id: int) -> bool | None: ...

    def unmark_busy(self, key_ids: list[int]) -> bool: ...

    def busy_elsewhere(self, key_id: int) -> bool | None: ...

    def counted_by(self, counts: Counts) -> None:
        """Where this instance's true counts are read from, to put them right in the store after an outage: each
        change must be in them before it is handed to `unreserve`, `hold_fee` or `written` (a resync that comes
        first takes the place of the change; `written`'s own count is then left as the resync set it)."""
        ...


class RedisLimits:
    """`SharedLimits` in Redis. Its methods are called from one thread, the event loop's (they share a connection);
    only its liveness thread runs beside it, on connections of its own."""

    def __init__(
        self,
        url: str,
        *,
        namespace: str,
        timeout_s: float = 0.25,
        retry_after_s: float = 1.0,
        alive_ttl_s: float = 15.0,
        written_ttl_s: float = 11.0,
    ) -> None:
        import redis  # noqa: PLC0415 (half a second of imports, paid only by an instance that uses Redis)

        self._errors = redis.RedisError
        self._no_script = redis.exceptions.NoScriptError
        self._answered_error = redis.exceptions.ResponseError
        self._closed_error = redis.exceptions.ConnectionError
        self._client: redis.Redis = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=0
        )
        self._conn: Any = None  # a redis.connection.AbstractConnection, whose methods redis-py leaves untyped
        """The event loop's own connection, used below the client's API: a check costs a third of the CPU."""
        self._conn_pid = 0
        self._prefix = f"orch:{namespace}:"
        self.instance = uuid.uuid4().hex
        """This process's name in the holds of every key (a new one per process: a restart's holds are new)."""
        self._retry_after_s = retry_after_s
        self._alive_ttl_ms = int(alive_ttl_s * 1000)
        self._written_ttl_ms = int(written_ttl_s * 1000)
        self._down_until: float | None = None
        """While set, Redis is not tried before this monotonic time (and the outage has been logged)."""
        self._heartbeat: threading.Thread | None = None
        self._heartbeat_pid = 0
        self._closed = threading.Event()
        self._adjusting: dict[str, int] = {}
        """Changes to this instance's counts, by pool, not sent yet: they go with the pipe's next write."""
        self._epoch = 0
        """Raised by each resync; sent with every change of this instance's counts (`Script.fenced`)."""
        self._fence = f"{self._prefix}fence:{self.instance}"
        self._stale = False
        """An outage may have left this instance's counts in Redis wrong: the next command puts them right first."""
        self._counts: Counts | None = None
        self._touched: set[tuple[Pool, int]] = set()
        """Every count this instance has changed (what a resync sets, to 0 where its ledger holds nothing)."""
        self._pipe = RedisPipe(connection_args(url), timeout_s=timeout_s, on_broken=self._lost)

    def allow_rpm(self, key_id: int, rpm: int) -> bool | None:
        """Count a request of the key in its minute window if it fits under `rpm`: whether it did, or None."""
        answers = self.run(_RPM, [self._rpm_call(key_id, rpm)])
        return None if answers is None else bool(answers[0])

    async def allow_rpm_async(self, key_id: int, rpm: int) -> bool | None:
        """`allow_rpm` without blocking the event loop."""
        answer = await self.run_async(_RPM, self._rpm_call(key_id, rpm))
        return None if answer is None else bool(answer)

    def _rpm_call(self, key_id: int, rpm: int) -> tuple[Any, ...]:
        return (f"{self._prefix}rpm:{key_id}", rpm)

    def counted_by(self, counts: Counts) -> None:
        self._counts = counts

    def reserve(self, key_id: int, worst: int, budget: int) -> bool | None:
        """Hold `worst` for the key if the holds and credits of every instance plus `worst` fit in `budget` (what
        the key has left before any of them): whether it was held, or None."""
        answers = self.run(_RESERVE, [self._reserve_call(key_id, worst, budget)])
        return None if answers is None else _fits(answers[0])

    async def reserve_async(self, key_id: int, worst: int, budget: int) -> bool | None:
        """`reserve` without blocking the event loop; a hold made for a caller cancelled meanwhile is given back."""
        answer = await self.run_async(
            _RESERVE, self._reserve_call(key_id, worst, budget), adds=(self._pool(key_id, "holds"), worst)
        )
        return None if answer is None else _fits(answer)

    def _reserve_call(self, key_id: int, worst: int, budget: int) -> tuple[Any, ...]:
        self.keep_alive()
        self._touched.add(("holds", key_id))
        holds, credits, alive = self._pool(key_id, "holds"), self._pool(key_id, "credits"), self.alive_prefix
        return (holds, credits, self.instance, worst, budget, alive, self._alive_ttl_ms)

    def take_credits(self, key_id: int, price: int, balance: int, quota_left: int) -> bool | None:
        """Take `price` credits of the key if they fit in `balance` (its balance before any instance's credits,
        holds or fees) after every instance's credits and the holds and fees past `quota_left`: whether they were
        taken, or None."""
        self.keep_alive()
        self._touched.add(("credits", key_id))
        credits, holds, alive = self._pool(key_id, "credits"), self._pool(key_id, "holds"), self.alive_prefix
        call = (credits, holds, self.instance, price, balance, quota_left, alive, self._alive_ttl_ms)
        answers = self.run(_CREDITS, [call])
        return None if answers is None else _fits(answers[0])

    def unreserve(self, key_id: int, amount: int, *, pool: Pool = "holds") -> None:
        """Give back `amount` held (or credits taken) here, deferred (dropped while Redis is out of reach: the
        resync after the outage sets what is held)."""
        self._adjust(key_id, pool, -amount)

    def hold_fee(self, key_id: int, fee: int) -> None:
        """Count a call's fee as a hold of this instance until it is written (`written`), deferred."""
        self._adjust(key_id, "holds", fee)

    def written(self, amounts: dict[int, int], *, pool: Pool = "holds") -> None:
        """Fees (or credits) held here, per key, are written to the database: counted for `written_ttl_s` more,
        which is how long every instance may take to read the accounts that carry them. One round trip for them
        all."""
        epoch = self._epoch  # what the ledger handed over is not in the counts a resync would set from here on
        self._send_adjustments(blocking=True)  # this instance's own count first: what is taken off it was added
        self._touched.update((pool, k) for k in amounts)
        batch, ttl = uuid.uuid4().hex, self._written_ttl_ms
        calls = [(self._pool(k, pool), self.instance, n, batch, ttl) for k, n in amounts.items()]
        self.run(_WRITTEN, calls, epoch=epoch)  # a resync since: the fees are counted as written, and not taken twice

    def mark_busy(self, key_id: int) -> bool | None:
        """This instance has calls of the key in flight or not yet written (until `unmark_busy`, or its death):
        whether that is known to every instance, or None."""
        self.keep_alive()
        answers = self.run(_BUSY, [(self.key(f"busy:{key_id}"), self.instance, self.alive_prefix, self._alive_ttl_ms)])
        return None if answers is None else True

    def unmark_busy(self, key_ids: list[int]) -> bool:
        """No call of these keys is in flight or unwritten here any more (one round trip): whether Redis heard it."""
        return self.run(_IDLE, [(self.key(f"busy:{k}"), self.instance) for k in key_ids]) is not None

    def busy_elsewhere(self, key_id: int) -> bool | None:
        """Whether another live instance has calls of the key in flight or not yet written, or None."""
        answers = self.run(_BUSY_ELSEWHERE, [(self.key(f"busy:{key_id}"), self.instance, self.alive_prefix)])
        return None if answers is None else answers[0] > 0

    def _pool(self, key_id: int, pool: Pool) -> str:
        return f"{self._prefix}{pool}:{key_id}"

    def key(self, name: str) -> str:
        """The Redis key `name` of this deployment."""
        return self._prefix + name

    @property
    def alive_prefix(self) -> str:
        """What an instance's liveness key is named after (its `instance` follows)."""
        return f"{self._prefix}alive:"

    @property
    def alive_ttl_ms(self) -> int:
        """How long an instance's liveness key lasts unless renewed (what a script that writes for it renews it by)."""
        return self._alive_ttl_ms

    def close(self) -> None:
        self._closed.set()
        self._pipe.close()
        with contextlib.suppress(self._errors):
            self._client.delete(f"{self._prefix}alive:{self.instance}")  # this instance's holds end with it
        if self._conn is not None:
            self._conn.disconnect()
        self._client.close()

    def _adjust(self, key_id: int, pool: Pool, amount: int) -> None:
        """Add `amount` to this instance's count of the key in `pool` with the event loop's next batch (now, outside
        a loop), summed with the turn's other changes of it: one command per count and turn, whatever the calls, its
        answer unread (a failure is dropped, as a check's would be, and put right by the resync after it)."""
        self._touched.add((pool, key_id))
        self._add(self._pool(key_id, pool), amount)

    def _add(self, name: str, amount: int) -> None:
        if self._down_until is not None and time.monotonic() < self._down_until:
            return
        self._adjusting[name] = self._adjusting.get(name, 0) + amount
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._send_adjustments(blocking=True)
            return
        self._pipe.before_write(self._send_adjustments)

    def _send_adjustments(self, *, blocking: bool = False) -> None:
        """Send the changes summed since the last batch: on the pipe (just before its write), or blocking (outside
        the event loop, or when what follows must come after them)."""
        if blocking and not self._usable():  # dropped in an outage; after one, the resync has set them
            self._adjusting = {}
            return
        pending, self._adjusting = self._adjusting, {}
        alive, ttl = self.alive_prefix, self._alive_ttl_ms
        calls = [(pool, self.instance, amount, alive, ttl) for pool, amount in pending.items() if amount]
        if not calls:
            return
        if blocking:
            self.run(_ADJUST, calls)
            return
        for call in calls:  # by SHA, and whole again if Redis answers that it does not know the script
            fenced = self._fenced(_ADJUST, call)
            self._pipe.send(
                "EVALSHA", _ADJUST.sha, _ADJUST.keys, *fenced, fallback=("EVAL", _ADJUST.text, _ADJUST.keys, *fenced)
            )

    async def run_async(
        self, script: Script, call: tuple[Any, ...], *, adds: tuple[str, int] | None = None
    ) -> int | None:
        """`run` for one call on the event loop's pipe: its answer, or None. `adds`: the count and the amount the
        script adds to this instance's when it answers 1: added again if a resync set the count meanwhile (it ran
        after the script, which its answer says was not fenced), and taken back if the caller was cancelled (unless
        a resync has set the count since)."""
        if not self._usable():
            return None
        epoch = self._epoch
        call = self._fenced(script, call)
        abandoned = None
        if adds is not None:  # a check that adds nothing (the RPM window's) has nothing to give back

            def abandoned(answer: Any) -> None:  # the caller was cancelled: what the script added is given back
                if answer == 1 and self._epoch == epoch:
                    self._add(adds[0], -adds[1])

        try:
            answer = await self._pipe.call("EVALSHA", script.sha, script.keys, *call, abandoned=abandoned)
            if isinstance(answer, hiredis.ReplyError) and str(answer).startswith("NOSCRIPT"):
                answer = await self._pipe.call("EVAL", script.text, script.keys, *call, abandoned=abandoned)
        except PipeBroken as e:
            self._unreachable(e)
            return None
        self._reachable()
        if isinstance(answer, hiredis.ReplyError):
            raise self._answered_error(str(answer))
        if adds is not None and answer == 1 and self._epoch != epoch:
            self._add(adds[0], adds[1])
        return int(answer)

    def run(self, script: Script, calls: list[tuple[Any, ...]], *, epoch: int | None = None) -> list[int] | None:
        """Run `script` once for each of `calls` (its key, then its arguments), in one round trip: the answers, or
        None when Redis cannot be reached (or is not tried for now). `epoch`: the one a fenced script's change was
        made in, when a resync may have come since (the current one otherwise)."""
        if not self._usable():
            return None
        answers = self._round_trip(script, [self._fenced(script, call, epoch) for call in calls])
        if answers is None:
            return None
        self._reachable()
        return [int(answer) for answer in answers]

    def _round_trip(self, script: Script, calls: list[tuple[Any, ...]]) -> list[Any] | None:
        """`calls` of `script` on the blocking connection: their answers, or None when Redis cannot be reached (the
        outage noted). An error Redis answers (a script's) is raised."""
        try:
            answers = self._exchange(script, calls)
        except self._errors as e:
            if self._conn is not None:
                self._conn.disconnect()  # connected again at the next try
            self._unreachable(e)
            return None
        for answer in answers:
            if isinstance(answer, Exception):
                raise answer
        return answers

    def _fenced(self, script: Script, call: tuple[Any, ...], epoch: int | None = None) -> tuple[Any, ...]:
        return (*call, self._fence, self._epoch if epoch is None else epoch) if script.fenced else call

    def _lost(self) -> None:
        """The pipe's connection failed: what it had sent may have run, or may still run."""
        self._stale = True

    def _usable(self) -> bool:
        """Whether Redis may be tried now: not while an outage is waited out, and not before this instance's counts
        are put right after one."""
        if self._down_until is not None and time.monotonic() < self._down_until:
            return False
        return not self._stale or self._resync()

    def _resync(self) -> bool:
        """Set every count this instance has changed to what its ledger holds, under a new epoch (one round trip,
        blocking: every command sent after it runs after it). Changes not sent yet are in what the ledger holds."""
        self._epoch += 1
        self._adjusting = {}
        counts = self._counts() if self._counts is not None else {}
        owned = sorted(self._touched | counts.keys())
        head = (self._fence, self.instance, self._epoch, self.alive_prefix, self._alive_ttl_ms)
        pairs = [x for pool, key_id in owned for x in (self._pool(key_id, pool), max(counts.get((pool, key_id), 0), 0))]
        step = 2 * _SYNC_BATCH
        calls = [(*head, *pairs[i : i + step]) for i in range(0, max(len(pairs), 1), step)]
        if self._round_trip(_SYNC, calls) is None:
            return False
        self._stale = False
        # What holds nothing here needs no setting again: a late command of an older epoch is fenced.
        self._touched = {owner for owner in owned if counts.get(owner, 0) > 0}
        log.info("redis.resynced", epoch=self._epoch, counts=len(owned))
        return True

    def _unreachable(self, e: Exception) -> None:
        self._stale = True
        if self._down_until is None:
            log.warning("redis.unreachable", error=type(e).__name__, detail=str(e), fallback="in-memory limits")
        self._down_until = time.monotonic() + self._retry_after_s

    def _reachable(self) -> None:
        if self._down_until is not None:
            self._down_until = None
            log.warning("redis.reachable", limits="shared again")

    def _exchange(self, script: Script, calls: list[tuple[Any, ...]]) -> list[Any]:
        """`_send`, on a new connection if this one was found closed while unused (the event loop's pipe may have
        seen Redis restart, or a timeout dropped it)."""
        try:
            return self._send(script, calls)
        except self._closed_error:
            self._conn.disconnect()
            return self._send(script, calls)

    def _send(self, script: Script, calls: list[tuple[Any, ...]]) -> list[Any]:
        if self._conn is None or self._conn_pid != os.getpid():  # a forked worker makes its own
            self._conn, self._conn_pid = self._client.connection_pool.make_connection(), os.getpid()
        conn = self._conn
        conn.send_packed_command(
            [part for call in calls for part in conn.pack_command("EVALSHA", script.sha, script.keys, *call)],
            check_health=False,
        )
        answers = [self._read(conn) for _ in calls]
        missing = [i for i, answer in enumerate(answers) if isinstance(answer, self._no_script)]
        if missing:  # a Redis that has not seen the script yet (or was restarted): sent whole, then cached
            conn.send_packed_command(
                [part for i in missing for part in conn.pack_command("EVAL", script.text, script.keys, *calls[i])],
                check_health=False,
            )
            for i in missing:
                answers[i] = self._read(conn)
        return answers

    def _read(self, conn: Any) -> Any:
        """The next answer, or the error Redis answered (each answer is read whole: the next one is read right)."""
        try:
            return conn.read_response(disable_decoding=True)
        except self._answered_error as e:
            return e

    def keep_alive(self) -> None:
        """Start the liveness thread in this process (again after a fork: threads do not survive one)."""
        if self._heartbeat is not None and self._heartbeat_pid == os.getpid():
            return
        self._heartbeat_pid = os.getpid()
        self._heartbeat = threading.Thread(target=self._beat, name="redis-alive", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        key = f"{self._prefix}alive:{self.instance}"
        while not self._closed.is_set():
            with contextlib.suppress(self._errors):  # the calls on the event loop log an outage
                beat = self._client.pipeline(transaction=False)
                beat.set(key, 1, px=self._alive_ttl_ms)
                beat.pexpire(self._fence, self._alive_ttl_ms)  # lasts as long as the instance (if a resync set it)
                beat.execute()
            self._closed.wait(self._alive_ttl_ms / 3000)


def _fits(answer: int) -> bool | None:
    """A check's answer: 1 done, 0 refused, -1 fenced (sent before a resync: not known, so not shared)."""
    return None if answer < 0 else bool(answer)
