"""The event loop's pipe to Redis, against a real redis-server: concurrent commands share one connection and get
their own answers in order, answers nobody reads never shift the others, and a Redis that stops or goes silent
fails the waiting commands (never hangs them) while the next command connects again."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid

import pytest
import redis

from orchestrator.platform.redis_limits import RedisLimits
from orchestrator.platform.redis_pipe import PipeBroken, RedisPipe
from tests.support.redis import RedisServer


def _pipe(server: RedisServer, timeout_s: float = 1.0) -> RedisPipe:
    kwargs = redis.Redis.from_url(server.url).connection_pool.connection_kwargs
    return RedisPipe({k: kwargs[k] for k in ("path", "host", "port", "db") if kwargs.get(k)}, timeout_s=timeout_s)


async def test_concurrent_commands_get_their_own_answers_on_one_connection(redis_server: RedisServer) -> None:
    pipe, key = _pipe(redis_server), f"t:{uuid.uuid4().hex}"
    watcher = redis.Redis.from_url(redis_server.url)
    connections = watcher.info("stats")["total_connections_received"]
    try:
        answers = await asyncio.gather(*(pipe.call("INCR", key) for _ in range(200)))
        assert sorted(answers) == list(range(1, 201))  # each call its own answer: no answer given twice or lost
        names = await asyncio.gather(*(pipe.call("ECHO", f"n{i}") for i in range(50)))
        assert names == [f"n{i}".encode() for i in range(50)]
        assert watcher.info("stats")["total_connections_received"] == connections + 1  # one, for the 250 commands
    finally:
        pipe.close()
        watcher.close()


async def test_unread_answers_do_not_shift_the_next_ones(redis_server: RedisServer) -> None:
    pipe, key = _pipe(redis_server), f"t:{uuid.uuid4().hex}"
    try:
        for i in range(20):
            pipe.send("INCRBY", key, 10)
            assert await pipe.call("ECHO", f"after {i}") == f"after {i}".encode()
        assert await pipe.call("GET", key) == b"200"
        error = await pipe.call("EVAL", "return redis.call('NOPE')", 0)
        assert "Unknown Redis command" in str(error)  # Redis's error is an answer, not a broken pipe
        assert await pipe.call("ECHO", "still") == b"still"
    finally:
        pipe.close()


async def test_a_redis_that_restarts_fails_the_waiting_and_serves_the_next(own_redis: RedisServer) -> None:
    pipe = _pipe(own_redis)
    try:
        assert await pipe.call("PING") == b"PONG"
        own_redis.pause()
        with pytest.raises(PipeBroken):
            await pipe.call("PING")
        own_redis.resume()
        assert await pipe.call("PING") == b"PONG"
    finally:
        pipe.close()


async def test_a_silent_redis_fails_the_waiting_within_the_timeout(own_redis: RedisServer) -> None:
    pipe = _pipe(own_redis, timeout_s=0.2)
    try:
        assert await pipe.call("PING") == b"PONG"
        with own_redis.frozen():  # stopped in place
            waiting = [asyncio.ensure_future(pipe.call("PING")) for _ in range(5)]
            done, _ = await asyncio.wait(waiting, timeout=10)
            assert len(done) == 5
            assert all(isinstance(f.exception(), PipeBroken) for f in done)
        assert await pipe.call("PING") == b"PONG"
    finally:
        pipe.close()


async def test_a_hold_made_for_a_caller_that_left_is_given_back(own_redis: RedisServer) -> None:
    limits = RedisLimits(own_redis.url, namespace=RedisServer.new_namespace(), timeout_s=10)
    watcher = redis.Redis.from_url(own_redis.url)
    holds = limits.key("holds:7")
    assert own_redis._proc is not None  # the test's own server, stopped in place
    try:
        assert await limits.reserve_async(7, 100, 1_000) is True
        limits.unreserve(7, 100)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while watcher.hget(holds, limits.instance) is not None:  # the warm-up hold given back
            assert loop.time() < deadline
            await asyncio.sleep(0.01)
        os.kill(own_redis._proc.pid, signal.SIGSTOP)
        try:
            written = limits._pipe._written  # the pipe's count of commands sent
            caller = asyncio.ensure_future(limits.reserve_async(7, 100, 1_000))
            while limits._pipe._written == written:  # sent, and Redis will run it once it wakes
                assert loop.time() < deadline
                await asyncio.sleep(0.01)
            caller.cancel()  # the client left while its hold was on its way
            await asyncio.gather(caller, return_exceptions=True)
        finally:
            os.kill(own_redis._proc.pid, signal.SIGCONT)
        while limits._pipe._answered <= written:  # the hold's answer came, to nobody
            assert loop.time() < deadline
            await asyncio.sleep(0.01)
        assert await limits._pipe.call("PING") == b"PONG"  # in order: whatever the answer set off has run
        assert watcher.hget(holds, limits.instance) is None  # the hold was made, then given back
    finally:
        limits.close()
        watcher.close()
        await asyncio.sleep(0)  # in the loop, which closes the pipe's connection


async def test_a_turns_holds_given_back_and_fees_go_as_one_command_per_key(own_redis: RedisServer) -> None:
    limits = RedisLimits(own_redis.url, namespace=RedisServer.new_namespace(), timeout_s=10)
    watcher = redis.Redis.from_url(own_redis.url)
    holds = limits.key("holds:7")
    try:
        assert all(await asyncio.gather(*(limits.reserve_async(7, 100, 10_000) for _ in range(21))))
        limits.unreserve(7, 100)  # Redis learns the script
        await limits._pipe.call("PING")
        await limits._pipe.call("PING")
        watcher.config_resetstat()
        for _ in range(20):  # twenty calls ending in one turn of the loop: each gives its hold back, then its fee
            limits.unreserve(7, 100)
            limits.hold_fee(7, 3)
        await limits._pipe.call("PING")  # written with the turn's changes, which go last in its write
        assert await limits._pipe.call("PING") == b"PONG"  # the next write: after them
        assert watcher.hget(holds, limits.instance) == b"60"
        scripts = watcher.info("commandstats")
        assert scripts["cmdstat_evalsha"]["calls"] == 1  # not 40
        assert "cmdstat_eval" not in scripts
    finally:
        limits.close()
        watcher.close()
        await asyncio.sleep(0)


async def test_a_change_sent_by_sha_to_a_redis_that_forgot_the_script_is_sent_whole(own_redis: RedisServer) -> None:
    limits = RedisLimits(own_redis.url, namespace=RedisServer.new_namespace(), timeout_s=10)
    watcher = redis.Redis.from_url(own_redis.url)
    holds = limits.key("holds:7")
    try:
        assert await limits.reserve_async(7, 100, 10_000) is True
        watcher.script_flush()  # as a restarted Redis, on the same connection
        limits.unreserve(7, 40)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while watcher.hget(holds, limits.instance) != b"60":  # NOSCRIPT, answered to nobody, then the whole script
            assert loop.time() < deadline
            await limits._pipe.call("PING")
    finally:
        limits.close()
        watcher.close()
        await asyncio.sleep(0)


async def test_written_fees_are_counted_without_a_key_looked_up_per_batch(own_redis: RedisServer) -> None:
    limits = RedisLimits(own_redis.url, namespace=RedisServer.new_namespace(), timeout_s=10, written_ttl_s=0.5)
    watcher = redis.Redis.from_url(own_redis.url)
    try:
        for _ in range(10):  # ten flushes, each its own batch of written fees
            limits.hold_fee(7, 10)
            limits.written({7: 10})
        watcher.config_resetstat()
        assert await limits.reserve_async(7, 100, 200) is True  # 100 written + 100 fits in 200
        assert await limits.reserve_async(7, 1, 200) is False
        assert "cmdstat_exists" not in watcher.info("commandstats")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not await limits.reserve_async(7, 1, 200):  # the batches expire on Redis's clock
            assert loop.time() < deadline
            await asyncio.sleep(0.05)
        assert watcher.hkeys(limits.key("holds:7")) == [limits.instance.encode()]  # the expired batches dropped
    finally:
        limits.close()
        watcher.close()
        await asyncio.sleep(0)
