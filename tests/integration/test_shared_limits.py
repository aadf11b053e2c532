"""Limits shared through Redis (`ORCH_REDIS_URL`), on the session's real redis-server: two instances (two
`RedisLimits`, as two processes have) count one requests-per-minute window per key and one set of spend holds per
key; a stopped instance's holds end with it; and a Redis out of reach is never an error, only a fall back to each
instance's own in-memory limits, logged once."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis
from structlog.testing import capture_logs

from orchestrator.billing.ledger import SharedLedger
from orchestrator.domain.spend import Account
from orchestrator.gateway.limits import SharedRpmLimiter
from orchestrator.platform.redis_limits import RedisLimits
from tests.support.redis import RedisServer
from tests.support.server import poll

MAY = 202405
KEY, OTHER = 1, 2
WORST = 100

MakeLimits = Callable[..., RedisLimits]


@pytest.fixture
def limits(redis_server: RedisServer) -> Iterator[MakeLimits]:
    """Instances of one deployment of the test's own on the session's Redis."""
    namespace = RedisServer.new_namespace()
    made: list[RedisLimits] = []

    def make(url: str = redis_server.url, **options: float) -> RedisLimits:
        made.append(RedisLimits(url, namespace=namespace, **options))
        return made[-1]

    yield make
    for shared in made:
        shared.close()


def balance(amount: int) -> Account:
    return Account(month_quota=0, balance=amount, month_fee=0, fee_month=MAY, metered=True)


def ledger_of(shared: RedisLimits, **accounts: Account) -> SharedLedger:
    ledger = SharedLedger(shared)
    ledger.replace({{"key": KEY, "other": OTHER}[name]: account for name, account in accounts.items()})
    return ledger


def test_two_instances_count_one_window_per_key(limits: MakeLimits) -> None:
    a, b = SharedRpmLimiter(limits()), SharedRpmLimiter(limits())
    answers = [(a if i % 2 else b).allow(KEY, 5) for i in range(20)]
    assert answers.count(True) == 5
    assert answers[:5] == [True] * 5  # the first five, whichever instance took them
    assert a.allow(OTHER, 5)  # each key has its own window
    assert b.allow(KEY, 6)  # a limit raised by one lets one more in, on either instance
    assert not a.allow(KEY, 6)


def test_holds_of_every_instance_count_against_the_key(limits: MakeLimits) -> None:
    a, b = ledger_of(limits(), key=balance(3 * WORST + 50)), ledger_of(limits(), key=balance(3 * WORST + 50))
    assert [a.reserve(KEY, WORST, MAY), b.reserve(KEY, WORST, MAY), a.reserve(KEY, WORST, MAY)] == [WORST] * 3
    assert b.reserve(KEY, WORST, MAY) is None  # 50 left over both: the fourth worst case fits on neither
    assert a.reserve(KEY, WORST, MAY) is None
    assert b.reserve(KEY, 50, MAY) == 50
    b.unreserve(KEY, WORST)
    assert a.reserve(KEY, WORST, MAY) == WORST  # a hold given back on one is free on the other
    assert a.reserve(OTHER, WORST, MAY) == 0  # a key that is not metered is never held nor refused


def test_a_fee_counts_on_every_instance_until_each_has_read_it_back(limits: MakeLimits) -> None:
    a = ledger_of(limits(written_ttl_s=0.5), key=balance(3 * WORST))
    b = ledger_of(limits(), key=balance(3 * WORST))
    assert a.reserve(KEY, WORST, MAY) == WORST
    a.unreserve(KEY, WORST)
    a.charge(KEY, 2 * WORST + 1)  # the call cost more than a worst case of the other's: left, 99
    assert b.reserve(KEY, WORST, MAY) is None
    assert a.reserve(KEY, WORST, MAY) is None  # and its own fee is not counted twice: 99 fits 99
    assert a.reserve(KEY, WORST - 1, MAY) == WORST - 1
    a.unreserve(KEY, WORST - 1)
    # Written, and read back by `a`; `b` has not read the accounts again, and the written fee still counts for it.
    a.settle([(KEY, 2 * WORST + 1, False)], {KEY: balance(WORST - 1)})
    assert b.reserve(KEY, WORST, MAY) is None
    b.replace({KEY: balance(WORST - 1)})  # its next reload; the fee is counted twice until the store lets it go
    poll(lambda: b.reserve(KEY, WORST - 1, MAY), lambda held: held == WORST - 1, timeout_s=10)
    assert a.reserve(KEY, 1, MAY) is None


def test_the_holds_of_a_stopped_instance_end_with_it(limits: MakeLimits) -> None:
    gone = limits()
    a, b = ledger_of(gone, key=balance(2 * WORST)), ledger_of(limits(), key=balance(2 * WORST))
    assert a.reserve(KEY, 2 * WORST, MAY) == 2 * WORST
    assert b.reserve(KEY, WORST, MAY) is None
    gone.close()  # its liveness key is gone, as it is once a crashed instance's expires
    assert b.reserve(KEY, 2 * WORST, MAY) == 2 * WORST


def test_an_unreachable_redis_falls_back_to_the_instances_own_limits(limits: MakeLimits) -> None:
    with capture_logs() as logs:
        shared = limits("unix:///nonexistent/orch-redis.sock", retry_after_s=3600)
        limiter = SharedRpmLimiter(shared)
        assert [limiter.allow(KEY, 2) for _ in range(3)] == [True, True, False]
        ledger = ledger_of(shared, key=balance(WORST))
        assert ledger.reserve(KEY, WORST, MAY) == WORST
        assert ledger.reserve(KEY, 1, MAY) is None
        ledger.unreserve(KEY, WORST)
        ledger.charge(KEY, 1)
        assert ledger.reserve(KEY, WORST - 1, MAY) == WORST - 1
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["redis.unreachable"]


def test_a_redis_that_goes_away_and_comes_back() -> None:
    server = RedisServer.private()
    try:
        shared = RedisLimits(server.url, namespace=RedisServer.new_namespace(), retry_after_s=0)
        other = RedisLimits(server.url, namespace=RedisServer.new_namespace())
        a = SharedRpmLimiter(shared)
        with capture_logs() as logs:
            assert a.allow(KEY, 1)
            assert SharedRpmLimiter(other).allow(KEY, 1)  # another deployment on the same Redis counts its own
            assert not SharedRpmLimiter(shared).allow(KEY, 1)  # this one's window is in Redis, not in `a`
            assert a.allow(OTHER, 2)
            server.pause()
            assert not a.allow(KEY, 1)  # this instance's own window, which counted its own call above
            assert a.allow(OTHER, 2)
            assert not a.allow(OTHER, 2)
            server.resume()
            assert a.allow(KEY, 1)  # a new Redis (nothing saved): a new window
            assert not a.allow(KEY, 1)
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["redis.unreachable", "redis.reachable"]
        shared.close()
        other.close()
    finally:
        server.stop()


def test_holds_as_large_as_a_balance_may_be_are_given_back_exactly(redis_server: RedisServer) -> None:
    big = 10**18 + 1  # a million dollars and a unit: past what a double holds exactly
    namespace = RedisServer.new_namespace()
    shared = RedisLimits(redis_server.url, namespace=namespace)
    try:
        ledger = ledger_of(shared, key=balance(4 * big))
        assert [ledger.reserve(KEY, big, MAY) for _ in range(5)] == [big, big, big, big, None]
        for _ in range(4):
            ledger.unreserve(KEY, big)
        with redis.Redis.from_url(redis_server.url) as client:
            assert not client.exists(f"orch:{namespace}:holds:{KEY}")  # every unit given back: nothing left held
    finally:
        shared.close()
