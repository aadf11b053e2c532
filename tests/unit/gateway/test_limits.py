"""Rate limits on their own: the sliding requests-per-minute window of a key (on a clock the test moves), the token
bucket of a replica (at the moments the test names) and the gate of an external endpoint (slots and spacing)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from orchestrator.gateway.limits import Gate, RpmLimiter, TokenBucket

KEY, OTHER = 1, 2


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def limiter_at(now: float = 1000.0) -> tuple[RpmLimiter, Clock]:
    clock = Clock(now)
    return RpmLimiter(clock=clock), clock


def allowed(limiter: RpmLimiter, key: int, rpm: int, times: int) -> list[bool]:
    return [limiter.allow(key, rpm) for _ in range(times)]


# -- requests per minute ---------------------------------------------------------------------------


def test_a_key_gets_its_rpm_in_a_minute_and_no_more() -> None:
    limiter, clock = limiter_at()
    assert allowed(limiter, KEY, 3, 5) == [True, True, True, False, False]
    clock.now += 59.9
    assert not limiter.allow(KEY, 3)


def test_a_refused_request_is_not_counted() -> None:
    limiter, clock = limiter_at()
    assert allowed(limiter, KEY, 2, 10) == [True, True] + [False] * 8
    clock.now += 90  # half of the last minute's 2 still weighs: 1 of 2 left, not less for the 8 refused
    assert allowed(limiter, KEY, 2, 2) == [True, False]


def test_the_previous_minute_weighs_by_how_much_of_it_still_overlaps() -> None:
    limiter, clock = limiter_at()
    assert allowed(limiter, KEY, 4, 4) == [True] * 4
    clock.now += 60  # the whole previous minute still overlaps: 4 of 4
    assert not limiter.allow(KEY, 4)
    clock.now += 15  # three quarters overlap: 3 of 4
    assert allowed(limiter, KEY, 4, 2) == [True, False]
    clock.now += 30  # a quarter overlaps: 1 + the 1 made this minute
    assert allowed(limiter, KEY, 4, 3) == [True, True, False]


def test_after_two_quiet_minutes_the_window_starts_afresh() -> None:
    limiter, clock = limiter_at()
    assert allowed(limiter, KEY, 2, 2) == [True, True]
    clock.now += 120
    assert allowed(limiter, KEY, 2, 3) == [True, True, False]


def test_the_window_moves_by_whole_minutes_from_the_first_request() -> None:
    limiter, clock = limiter_at()
    assert allowed(limiter, KEY, 2, 2) == [True, True]
    clock.now += 119.9  # the second minute is nearly over: the first's 2 weigh 0.1/60 of themselves
    assert allowed(limiter, KEY, 2, 3) == [True, True, False]
    clock.now += 0.2  # a third minute: the second's 2 weigh 59.9/60 of themselves (1.997), room for one
    assert allowed(limiter, KEY, 2, 2) == [True, False]


def test_the_estimate_is_fractional_so_rpm_one_may_pass_twice_across_a_minute_boundary() -> None:
    # The previous minute's count is spread over the minute: at 0.1 s into the next one it weighs 0.998 < 1.
    limiter, clock = limiter_at()
    assert limiter.allow(KEY, 1)
    clock.now += 119.9
    assert limiter.allow(KEY, 1)
    clock.now += 0.2
    assert limiter.allow(KEY, 1)
    assert not limiter.allow(KEY, 1)


def test_each_key_has_its_own_window() -> None:
    limiter, _ = limiter_at()
    assert allowed(limiter, KEY, 1, 2) == [True, False]
    assert allowed(limiter, OTHER, 1, 2) == [True, False]


def test_a_limit_of_zero_refuses_everything() -> None:
    limiter, _ = limiter_at()
    assert not limiter.allow(KEY, 0)


def test_the_limit_is_read_at_each_request() -> None:
    limiter, _ = limiter_at()
    assert allowed(limiter, KEY, 2, 3) == [True, True, False]
    assert limiter.allow(KEY, 3)  # raised: one more


# -- token bucket ----------------------------------------------------------------------------------


def test_a_bucket_starts_full_and_each_take_uses_a_token() -> None:
    bucket = TokenBucket(2)
    assert bucket.tokens == 2
    assert bucket.has_token(500.0)
    bucket.take()
    assert bucket.has_token(500.0)
    bucket.take()
    assert not bucket.has_token(500.0)


def test_asking_does_not_take() -> None:
    bucket = TokenBucket(1)
    assert all(bucket.has_token(10.0) for _ in range(5))


def test_tokens_come_back_at_the_rate() -> None:
    bucket = TokenBucket(2)
    bucket.has_token(100.0)
    bucket.take()
    bucket.take()
    assert not bucket.has_token(100.25)  # half a token
    assert bucket.has_token(100.5)  # one
    bucket.take()
    assert not bucket.has_token(100.5)


def test_the_burst_is_the_rate() -> None:
    bucket = TokenBucket(3)
    bucket.has_token(0.0)
    for _ in range(3):
        bucket.take()
    assert bucket.has_token(3600.0)  # an hour idle refills to 3, not more
    assert bucket.tokens == 3
    for _ in range(3):
        bucket.take()
    assert not bucket.has_token(3600.0)


# -- gate ------------------------------------------------------------------------------------------


async def spin() -> None:
    """Let every task that can run, run (no time passes)."""
    for _ in range(10):
        await asyncio.sleep(0)


def entering(gate: Gate, log: list[str], name: str) -> asyncio.Task[None]:
    async def enter() -> None:
        await gate.enter()
        log.append(name)

    return asyncio.create_task(enter())


async def test_a_gate_of_zeros_lets_every_call_in_at_once() -> None:
    gate = Gate(0, 0)
    for _ in range(100):
        await gate.enter()
    gate.leave()  # nothing to give back: a no-op


async def test_at_most_concurrency_calls_are_inside_and_the_rest_wait_in_order() -> None:
    gate = Gate(2, 0)
    log: list[str] = []
    tasks = [entering(gate, log, name) for name in "abcd"]
    await spin()
    assert log == ["a", "b"]
    gate.leave()
    await spin()
    assert log == ["a", "b", "c"]
    gate.leave()
    await spin()
    assert log == ["a", "b", "c", "d"]
    await asyncio.gather(*tasks)


async def test_the_first_call_of_a_spaced_gate_starts_at_once_and_the_next_waits_its_turn() -> None:
    gate = Gate(0, 1)  # one start a second
    await gate.enter()
    log: list[str] = []
    second = entering(gate, log, "second")
    await spin()
    assert log == []  # a second apart: not yet
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second


async def test_a_call_cancelled_while_waiting_for_its_start_gives_its_slot_back() -> None:
    gate = Gate(1, 1)
    await gate.enter()
    gate.leave()
    waiting = asyncio.create_task(gate.enter())  # has the slot, waits for its start time
    await spin()
    assert not waiting.done()
    slots = gate._slots
    assert slots is not None
    assert slots.locked()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not slots.locked()


@pytest.mark.parametrize("make", [lambda: Gate(3, 0), lambda: Gate(0, 0)])
async def test_leave_gives_a_slot_back_for_the_next_call(make: Callable[[], Gate]) -> None:
    gate = make()
    for _ in range(3):
        await gate.enter()
    gate.leave()
    await asyncio.wait_for(gate.enter(), timeout=5)  # a slot was free: no wait
