"""A Redis pub/sub channel on a real Redis: every message reaches each subscriber whole and in order, however the
reads split them; a Redis that refuses the connection's password, or is not there, is a `ConnectionError` saying why;
a subscribed connection whose Redis stops answering is noticed by its own PING, not waited on for ever."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from orchestrator.platform.redis_channel import RedisChannel
from tests.support.redis import RedisServer


def _channel(url: str, *, timeout_s: float = 5.0, check_every_s: float = 10.0) -> RedisChannel:
    """A channel of the test's own on the Redis at `url`."""
    name = f"orch:{RedisServer.new_namespace()}:changes"
    return RedisChannel(url, name, timeout_s=timeout_s, check_every_s=check_every_s)


async def test_every_message_reaches_each_subscriber_whole_and_in_order(redis_server: RedisServer) -> None:
    channel = _channel(redis_server.url)
    heard: tuple[list[str], list[str]] = ([], [])
    subscriptions = [await channel.listen(got.append) for got in heard]
    tasks = [asyncio.create_task(s.until_lost()) for s in subscriptions]
    try:
        sent = [f"{i}:" + "é" * (i % 7) * 1000 for i in range(500)]  # up to 14 KB each: reads end mid-message
        counts = await asyncio.gather(*(channel.publish(m) for m in sent))
        assert set(counts) == {2}  # each publish reached both
        deadline = time.monotonic() + 10
        while any(len(got) < len(sent) for got in heard):
            assert time.monotonic() < deadline, [len(got) for got in heard]
            await asyncio.sleep(0.01)
        assert heard == (sent, sent)
    finally:
        for task in tasks:
            task.cancel()
        for s in subscriptions:
            await s.close()
    assert await channel.publish("late") == 0  # nobody listens any more
    channel.close()


async def test_a_wrong_password_or_no_redis_is_a_connection_error_saying_why(own_redis: RedisServer) -> None:
    with redis.Redis.from_url(own_redis.url) as admin:
        admin.config_set("requirepass", "right-password")
    wrong = own_redis.url.replace("unix://", "unix://:wrong-password@")
    channel = _channel(wrong)
    with pytest.raises(ConnectionError, match=r"WRONGPASS|invalid password"):
        await channel.listen(lambda _: None)
    with pytest.raises(ConnectionError, match=r"WRONGPASS|invalid password|NOAUTH"):
        await channel.publish("x")
    channel.close()
    right = _channel(own_redis.url.replace("unix://", "unix://:right-password@"))
    subscription = await right.listen(lambda _: None)
    assert await right.publish("x") == 1
    await subscription.close()
    right.close()

    own_redis.pause()
    gone = _channel(own_redis.url)
    with pytest.raises(ConnectionError):
        await gone.listen(lambda _: None)
    with pytest.raises(ConnectionError):
        await gone.publish("x")
    gone.close()


async def test_a_redis_that_stops_answering_ends_the_subscription_after_its_ping(own_redis: RedisServer) -> None:
    channel = _channel(own_redis.url, timeout_s=0.3, check_every_s=0.2)
    subscription = await channel.listen(lambda _: None)
    try:
        with redis.Redis.from_url(own_redis.url) as watcher:
            watcher.config_resetstat()
            waiting = asyncio.create_task(subscription.until_lost())
            deadline = time.monotonic() + 10
            while watcher.info("commandstats").get("cmdstat_ping", {}).get("calls", 0) < 2:
                assert time.monotonic() < deadline, "the quiet subscription was never PINGed"
                await asyncio.sleep(0.01)
        assert not waiting.done()  # quiet but answering: still listening
        with own_redis.frozen():
            why = await asyncio.wait_for(waiting, 10)
        assert why == "no answer from Redis in 0.3 s"
    finally:
        await subscription.close()
        channel.close()
