"""`RedisFlight` on the session's real redis-server, with two instances (two `RedisLimits`, as two processes have):
counts of calls in flight and gate slots are every live instance's, die with a stopped instance, and a Redis out of
reach leaves each instance counting its own, never an error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from structlog.testing import capture_logs

from orchestrator.gateway.limits import SharedGate
from orchestrator.platform.redis_flight import FULL, RedisFlight
from orchestrator.platform.redis_limits import RedisLimits
from tests.support.redis import RedisServer

MakeFlight = Callable[..., tuple[RedisLimits, RedisFlight]]


@pytest.fixture
async def flights(redis_server: RedisServer) -> AsyncIterator[MakeFlight]:
    """Instances of one deployment of the test's own on the session's Redis."""
    namespace = RedisServer.new_namespace()
    made: list[RedisLimits] = []

    def make(url: str = redis_server.url, **options: float) -> tuple[RedisLimits, RedisFlight]:
        made.append(RedisLimits(url, namespace=namespace, **options))
        return made[-1], RedisFlight(made[-1])

    yield make
    for limits in made:
        limits.close()
    await asyncio.sleep(0)  # in the loop, which closes their pipes' connections


async def seen(flight: RedisFlight, targets: list[str], counts: list[int]) -> None:
    """Until `flight` sees the other instances' `counts` of `targets` (changed counts are written a moment later)."""
    async with asyncio.timeout(10):
        while flight.others(targets) != counts:  # noqa: ASYNC110 (read from Redis)
            await asyncio.sleep(0.001)


async def test_each_instance_sees_the_others_calls_in_flight(flights: MakeFlight) -> None:
    _, a = flights()
    _, b = flights()
    a.started("r1")
    a.started("r1")
    b.started("r1")
    b.started("r2")
    await seen(a, ["r1", "r2", "r3"], [1, 1, 0])
    await seen(b, ["r1", "r2"], [2, 0])
    assert a.mine("r1") == 2
    a.ended("r1")
    a.ended("r1")
    a.started("r1")  # changes close together are written once, as they stand by then
    await seen(b, ["r1"], [1])
    a.ended("r1")
    await seen(b, ["r1"], [0])


async def test_the_counts_and_slots_of_a_stopped_instance_end_with_it(flights: MakeFlight) -> None:
    gone_limits, gone = flights()
    _, b = flights()
    gone.started("r1")
    await seen(b, ["r1"], [1])
    assert gone.take_slot("ep", 1, 0) == 0
    assert b.take_slot("ep", 1, 0) == FULL  # one slot over both, taken
    gone_limits.close()  # its liveness key is gone, as a killed instance's expires
    assert b.others(["r1"]) == [0]
    assert b.take_slot("ep", 1, 0) == 0


async def test_starts_are_spaced_over_every_instance(flights: MakeFlight) -> None:
    _, a = flights()
    _, b = flights()
    delays = [(a if i % 2 else b).take_slot("ep", 0, 10.0) for i in range(4)]  # one start every 10 s
    assert delays[0] == 0
    # Each start 10 s after the one before, whichever instance took it (less the microseconds between the calls).
    assert [round(d or 0) for d in delays] == [0, 10, 20, 30]


async def test_a_gate_without_redis_counts_this_instances_calls(flights: MakeFlight) -> None:
    with capture_logs() as logs:
        _, flight = flights("unix:///nonexistent/orch-redis.sock", retry_after_s=3600)
        gate = SharedGate(1, 0, flight, "ep")
        await gate.enter()  # at once: no other call here
        second = asyncio.create_task(gate.enter())
        await asyncio.sleep(0.1)  # several of the gate's polls
        assert not second.done()  # one slot, taken here
        gate.leave()
        await asyncio.wait_for(second, timeout=10)
        gate.leave()
        assert flight.others(["r1"]) is None  # unknown: the catalog counts its own
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["redis.unreachable"]


async def test_a_slot_freed_on_another_instance_lets_a_waiting_call_in(flights: MakeFlight) -> None:
    _, a = flights()
    _, b = flights()
    gate_a, gate_b = SharedGate(1, 0, a, "ep"), SharedGate(1, 0, b, "ep")
    await gate_a.enter()
    waiting = asyncio.create_task(gate_b.enter())
    await asyncio.sleep(0.1)
    assert not waiting.done()
    gate_a.leave()  # written at the next turn; `b` finds it at its next poll
    await asyncio.wait_for(waiting, timeout=10)
    assert a.take_slot("ep", 1, 0) == FULL
    gate_b.leave()  # written a moment later
    async with asyncio.timeout(10):
        while a.take_slot("ep", 1, 0) == FULL:  # noqa: ASYNC110 (read from Redis)
            await asyncio.sleep(0.001)


async def test_a_call_cancelled_at_the_gate_holds_no_slot(flights: MakeFlight) -> None:
    _, a = flights()
    _, b = flights()
    gate = SharedGate(1, 1, a, "ep")  # one at a time, one start a second
    await gate.enter()
    waiting = asyncio.create_task(gate.enter())
    await asyncio.sleep(0.05)
    waiting.cancel()  # the client left while in line
    await asyncio.gather(waiting, return_exceptions=True)
    gate.leave()
    spaced = asyncio.create_task(gate.enter())  # a slot at once, its start a second after the first
    async with asyncio.timeout(10):  # the slot taken, its start still ahead
        while a.inside("ep") != 1:  # noqa: ASYNC110 (set by the task's Redis round trip)
            await asyncio.sleep(0.001)
    assert not spaced.done()
    spaced.cancel()  # the client left while waiting for its start: the slot is given back
    await asyncio.gather(spaced, return_exceptions=True)
    assert a.inside("ep") == 0
    async with asyncio.timeout(10):
        while b.take_slot("ep", 1, 0) == FULL:  # noqa: ASYNC110 (read from Redis)
            await asyncio.sleep(0.001)
