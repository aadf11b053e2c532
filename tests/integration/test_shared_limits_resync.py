"""After Redis was out of reach, an instance puts its counts there right before anything else, on a real
redis-server: a hold given back during a stall (dropped) and a check whose answer never came (run when Redis resumed)
leave nothing held; a change sent before the resync that runs after it changes nothing (it is fenced)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from structlog.testing import capture_logs

from orchestrator.billing.ledger import SharedLedger
from orchestrator.platform.redis_limits import _ADJUST, _SYNC, _WRITTEN, RedisLimits
from tests.integration.test_shared_limits import KEY, MAY, WORST, balance, ledger_of
from tests.support.redis import RedisServer
from tests.support.server import poll


@contextmanager
def instance(server: RedisServer, **options: float) -> Iterator[tuple[RedisLimits, SharedLedger, str]]:
    """One instance on `server` (Redis tried again at once after a failure), its ledger of a key with 10 worst cases
    left, and the name of the key's holds in Redis."""
    namespace = RedisServer.new_namespace()
    shared = RedisLimits(server.url, namespace=namespace, retry_after_s=0, **options)
    try:
        yield shared, ledger_of(shared, key=balance(10 * WORST)), f"orch:{namespace}:holds:{KEY}"
    finally:
        shared.close()


def _fence(shared: RedisLimits, holds: str) -> str:
    return holds.replace(f"holds:{KEY}", f"fence:{shared.instance}")


def _counts(server: RedisServer, name: str) -> dict[str, int]:
    with redis.Redis.from_url(server.url, decode_responses=True) as client:
        return {owner: int(n) for owner, n in client.hgetall(name).items()}


async def test_a_hold_taken_during_a_stall_is_not_left_held(own_redis: RedisServer) -> None:
    namespace = RedisServer.new_namespace()
    here = RedisLimits(own_redis.url, namespace=namespace, retry_after_s=0)
    there = RedisLimits(own_redis.url, namespace=namespace)
    try:
        a, b = ledger_of(here, key=balance(3 * WORST)), ledger_of(there, key=balance(3 * WORST))
        assert await a.reserve_async(KEY, WORST, MAY) == WORST
        with capture_logs() as logs:
            with own_redis.frozen():  # no answer: the command waits its 0.25 s, then falls back
                # Held by this instance's own rule; its command runs when Redis resumes, its answer never read.
                assert await a.reserve_async(KEY, WORST, MAY) == WORST
                a.unreserve(KEY, WORST)  # both calls end
                a.unreserve(KEY, WORST)
            assert await a.reserve_async(KEY, 1, MAY) == 1  # the first command after the outage: a resync, then it
        holds = f"orch:{namespace}:holds:{KEY}"
        assert _counts(own_redis, holds) == {here.instance: 1}
        assert b.reserve(KEY, 3 * WORST - 1, MAY) == 3 * WORST - 1  # all but that one unit is free for the others
        events = [e["event"] for e in logs if e["event"].startswith("redis.")]
        assert events == ["redis.unreachable", "redis.resynced", "redis.reachable"]
    finally:
        here.close()
        there.close()


def test_a_change_sent_before_the_resync_changes_nothing_when_it_runs_after(own_redis: RedisServer) -> None:
    with instance(own_redis) as (shared, ledger, holds):
        assert ledger.reserve(KEY, WORST, MAY) == WORST
        with own_redis.frozen():
            assert ledger.reserve(KEY, WORST, MAY) == WORST  # no answer: an outage, held here alone
        assert ledger.reserve(KEY, 2, MAY) == 2  # the resync (epoch 1): in Redis, this instance holds WORST + 2
        assert _counts(own_redis, holds) == {shared.instance: WORST + 2}
        fence, alive, ttl = _fence(shared, holds), shared.alive_prefix, shared.alive_ttl_ms
        with redis.Redis.from_url(own_redis.url) as client:
            # What a connection given up for lost still held, run now: a give-back and a write, of epoch 0.
            assert client.eval(_ADJUST.text, 1, holds, shared.instance, -WORST, alive, ttl, fence, 0) == -1
            client.eval(_WRITTEN.text, 1, holds, shared.instance, 2, "batch", 10_000, fence, 0)
            assert _counts(own_redis, holds)[shared.instance] == WORST + 2  # unchanged by either
            written = [owner for owner in _counts(own_redis, holds) if owner.startswith("w:")]
            assert len(written) == 1  # the fees written are still counted as written
            # The same of the current epoch does change it.
            assert client.eval(_ADJUST.text, 1, holds, shared.instance, -2, alive, ttl, fence, 1) == 1
        assert _counts(own_redis, holds)[shared.instance] == WORST


def test_the_fence_lasts_as_long_as_the_instance(own_redis: RedisServer) -> None:
    with instance(own_redis, alive_ttl_s=0.6) as (shared, ledger, holds):
        with own_redis.frozen():
            assert ledger.reserve(KEY, WORST, MAY) == WORST
        assert ledger.reserve(KEY, 1, MAY) == 1  # resynced: the fence is set, to expire with the liveness key
        fence = _fence(shared, holds)
        with redis.Redis.from_url(own_redis.url) as client:
            epoch = client.get(fence)
            assert epoch is not None
            seen: list[int] = []

            def renewed() -> bool:  # its time to live went down, then up again: the liveness thread renewed it
                seen.append(client.pttl(fence))
                return any(later > earlier for earlier, later in itertools.pairwise(seen))

            poll(renewed, bool, timeout_s=10)
            assert client.get(fence) == epoch
            shared.close()
            poll(lambda: client.exists(fence), lambda n: n == 0, timeout_s=5)  # and gone after it


def test_a_fee_charged_as_redis_comes_back_is_counted_once(own_redis: RedisServer) -> None:
    with instance(own_redis) as (shared, ledger, holds):
        assert ledger.reserve(KEY, WORST, MAY) == WORST
        with own_redis.frozen():
            ledger.unreserve(KEY, WORST)  # no answer: an outage
        ledger.charge(KEY, 3)  # the first command after it: the resync, which sets the fee with the rest
        assert _counts(own_redis, holds) == {shared.instance: 3}


def test_fees_written_as_redis_comes_back_are_taken_off_once(own_redis: RedisServer) -> None:
    with instance(own_redis) as (shared, ledger, holds):
        ledger.charge(KEY, 3)  # held as this instance's fee until written
        assert _counts(own_redis, holds) == {shared.instance: 3}
        with own_redis.frozen():
            assert ledger.busy_elsewhere(KEY) is None  # no answer: an outage
        # The records flush writes the fee: its first command is the resync (this instance holds nothing now), and
        # the fee is then counted as written, not taken off this instance's count a second time.
        ledger.settle([(KEY, 3, False)], {KEY: balance(10 * WORST - 3)})
        counts = _counts(own_redis, holds)
        assert shared.instance not in counts
        assert [n for owner, n in counts.items() if owner.startswith("w:")] == [3]


def test_an_older_resync_that_runs_late_changes_nothing(own_redis: RedisServer) -> None:
    with instance(own_redis) as (shared, ledger, holds):
        assert ledger.reserve(KEY, WORST, MAY) == WORST
        with own_redis.frozen():
            assert ledger.busy_elsewhere(KEY) is None
        assert ledger.reserve(KEY, 1, MAY) == 1  # the resync
        fence = _fence(shared, holds)
        with redis.Redis.from_url(own_redis.url) as client:
            epoch = int(client.get(fence) or 0)
            # One sent before it (on a connection given up for lost while Redis was stalled), run now.
            args = (shared.instance, epoch - 1, shared.alive_prefix, shared.alive_ttl_ms, holds, 0)
            assert client.eval(_SYNC.text, 1, fence, *args) == 0
            assert int(client.get(fence) or 0) == epoch
        assert _counts(own_redis, holds) == {shared.instance: WORST + 1}
