"""The priority queue on its own: order, room, and every way a waiter leaves (let through, timed out, abandoned)
without leaking a slot."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import cast

import pytest

from orchestrator.gateway.catalog import Catalog
from orchestrator.gateway.priority import PriorityQueues, QueueTimeout


class Replica:
    gate = None

    def __init__(self, inflight: int) -> None:
        self.inflight = inflight

    def available(self, _now: float) -> bool:
        return True


def queues(replica: Replica, slots: int = 1) -> PriorityQueues:
    return PriorityQueues(
        cast(Catalog, SimpleNamespace(pools={"m": [replica]}, flight=None)), slots=slots, timeout_s=60
    )


async def test_the_lowest_priority_goes_first_and_ties_keep_their_order() -> None:
    replica = Replica(inflight=1)
    q = queues(replica)
    order: list[str] = []

    async def request(tag: str, priority: int) -> None:
        await q.wait_turn("m", priority)
        order.append(tag)
        replica.inflight += 1  # picked: in flight now
        q.sent("m")

    tasks = []
    for tag, priority in [("a", 5), ("b", 1), ("c", 3), ("d", 1)]:
        tasks.append(asyncio.create_task(request(tag, priority)))
        await asyncio.sleep(0)
    assert q.waiting("m") == 4
    for _ in range(4):  # each finished call makes room for exactly one
        replica.inflight -= 1
        q.wake("m")
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == ["b", "d", "c", "a"]


async def test_a_request_with_room_and_no_one_ahead_goes_at_once() -> None:
    q = queues(Replica(inflight=1), slots=2)
    await asyncio.wait_for(q.wait_turn("m", 0), 1)
    q.sent("m")
    assert q.waiting("m") == 0


async def test_a_turn_given_as_the_timeout_fires_is_never_lost() -> None:
    replica = Replica(inflight=1)
    q = queues(replica)
    for _ in range(50):
        replica.inflight = 1
        waiter = asyncio.create_task(q.wait_turn("m", 0, 0.01))
        await asyncio.sleep(0)

        def free() -> None:
            replica.inflight = 0
            q.wake("m")

        asyncio.get_running_loop().call_later(0.01, free)  # the same instant as the timeout
        try:
            await waiter
            q.sent("m")
        except QueueTimeout:
            pass
        assert q._admitted.get("m", 0) == 0
        assert q.waiting("m") == 0


async def test_an_abandoned_waiter_leaves_no_trace_and_passes_a_given_turn_on() -> None:
    replica = Replica(inflight=1)
    q = queues(replica)
    first = asyncio.create_task(q.wait_turn("m", 0))
    second = asyncio.create_task(q.wait_turn("m", 1))
    await asyncio.sleep(0)
    first.cancel()  # left while waiting
    with pytest.raises(asyncio.CancelledError):
        await first
    assert q.waiting("m") == 1
    replica.inflight = 0
    q.wake("m")  # the second is let through...
    second.cancel()  # ...and leaves before it runs: its turn goes back
    with pytest.raises(asyncio.CancelledError):
        await second
    assert q._admitted.get("m", 0) == 0
    third = asyncio.create_task(q.wait_turn("m", 0))
    await asyncio.wait_for(third, 1)  # the room is still there for the next one


async def test_a_timeout_is_a_queue_timeout() -> None:
    q = queues(Replica(inflight=1))
    with pytest.raises(QueueTimeout, match="waiting in the queue for model m"):
        await q.wait_turn("m", 0, 0.01)
    assert q.waiting("m") == 0
