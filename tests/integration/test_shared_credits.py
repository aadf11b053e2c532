"""Money paths over several instances on one Redis (`ORCH_REDIS_URL`), on the session's real redis-server: LlmEndpoint's
credits are checked and taken in one step counted over every instance, given back once, and counted with a metered
key's holds; and a key's calls in flight or unwritten on one instance are seen by the others, so that deleting it
there disables it instead."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs

from api.app import create_app
from orchestrator.billing.ledger import SharedLedger
from orchestrator.domain.money import CREDIT, UNIT
from orchestrator.domain.spend import Account
from orchestrator.platform.redis_limits import RedisLimits
from orchestrator.runtime.compose import Runtime, build_deps
from tests.support.engines import Engine, engine_in_process
from tests.support.gateway import funded_key, make_ready
from tests.support.redis import RedisServer
from tests.support.server import poll
from tests.support.settings import ADMIN_KEY, instance_settings

MAY = 202405
KEY = 1
PRICE = 100
MODEL = "llama3.1"  # in the seeded rate table
PATH = "/api/v1/completions"
BODY = {"messages": [{"role": "user", "content": "What is the meaning of life?"}], "model": MODEL, "max_tokens": 5}
BODY_CREDITS = 3800 * CREDIT  # what BODY costs (28 characters at 0.01 cents, 5 tokens at 0.02)

MakeLimits = Callable[..., RedisLimits]


@pytest.fixture
def limits(redis_server: RedisServer) -> Iterator[MakeLimits]:
    """Instances of one deployment of the test's own on the session's Redis."""
    namespace = RedisServer.new_namespace()
    made: list[RedisLimits] = []

    def make(**options: float) -> RedisLimits:
        made.append(RedisLimits(redis_server.url, namespace=namespace, **options))
        return made[-1]

    yield make
    for shared in made:
        shared.close()


def account(balance: int, *, quota: int = 0, metered: bool = False) -> Account:
    return Account(month_quota=quota, balance=balance, month_fee=0, fee_month=MAY, metered=metered)


def ledger_of(shared: RedisLimits, key: Account, unwritten: Callable[[int], bool] | None = None) -> SharedLedger:
    ledger = SharedLedger(shared, unwritten=unwritten)
    ledger.replace({KEY: key})
    return ledger


def test_credits_taken_on_every_instance_never_exceed_the_balance(limits: MakeLimits) -> None:
    a, b = ledger_of(limits(), account(3 * PRICE + 50)), ledger_of(limits(), account(3 * PRICE + 50))
    taken = [(a if i % 2 else b).take_credits(KEY, PRICE, MAY) for i in range(6)]
    assert taken == [True, True, True, False, False, False]
    assert b.take_credits(KEY, 50, MAY)  # exactly what is left, on either
    assert not a.take_credits(KEY, 1, MAY)
    a.give_credits(KEY, PRICE)  # a call that delivered nothing: its credits are free on the other
    assert b.take_credits(KEY, PRICE, MAY)
    assert not a.take_credits(KEY, 1, MAY)
    assert a.balance(KEY, MAY) == 3 * PRICE + 50  # its own view holds its own credits (all given back) alone


def test_credits_given_back_once_are_free_once(limits: MakeLimits) -> None:
    a, b = ledger_of(limits(), account(2 * PRICE)), ledger_of(limits(), account(2 * PRICE))
    assert a.take_credits(KEY, PRICE, MAY)
    assert a.take_credits(KEY, PRICE, MAY)
    a.give_credits(KEY, PRICE)
    assert b.take_credits(KEY, PRICE, MAY)
    assert not b.take_credits(KEY, PRICE, MAY)  # one given back frees one, not two


def test_credits_written_count_on_every_instance_until_each_has_read_them_back(limits: MakeLimits) -> None:
    a, b = ledger_of(limits(written_ttl_s=0.5), account(2 * PRICE)), ledger_of(limits(), account(2 * PRICE))
    assert a.take_credits(KEY, PRICE, MAY)
    # Written, and read back by `a`; `b` has not read the accounts again: the written credits still count for it.
    a.settle([(KEY, PRICE, True)], {KEY: account(PRICE)})
    assert not b.take_credits(KEY, PRICE + 1, MAY)
    assert not a.take_credits(KEY, PRICE + 1, MAY)
    b.replace({KEY: account(PRICE)})  # its next reload; counted twice until the written credits expire
    poll(lambda: b.take_credits(KEY, PRICE, MAY), bool, timeout_s=10)
    assert not a.take_credits(KEY, 1, MAY)


def test_a_metered_keys_holds_and_credits_count_together(limits: MakeLimits) -> None:
    # 100 of quota, 200 of balance: holds take the quota first, credits the balance alone.
    key = account(2 * PRICE, quota=PRICE, metered=True)
    a, b = ledger_of(limits(), key), ledger_of(limits(), key)
    assert a.reserve(KEY, 2 * PRICE, MAY) == 2 * PRICE  # the quota, and 100 of the balance
    assert not b.take_credits(KEY, PRICE + 1, MAY)
    assert b.take_credits(KEY, PRICE, MAY)
    assert a.reserve(KEY, 1, MAY) is None  # nothing left, on either
    assert b.reserve(KEY, 1, MAY) is None
    a.unreserve(KEY, 2 * PRICE)
    assert b.reserve(KEY, 2 * PRICE, MAY) == 2 * PRICE  # 300 in all, the credits' 100 taken


def test_a_keys_calls_on_one_instance_are_seen_by_the_others_until_written(limits: MakeLimits) -> None:
    unwritten: set[int] = set()
    a = ledger_of(limits(), account(0), unwritten=unwritten.__contains__)
    b = ledger_of(limits(), account(0))
    assert b.busy_elsewhere(KEY) is False
    assert a.reserve(KEY, 0, MAY) == 0  # a key that is not metered: held nothing, but in flight
    assert a.busy_elsewhere(KEY) is False  # its own calls are not elsewhere
    assert b.busy_elsewhere(KEY) is True
    a.unreserve(KEY, 0)
    unwritten.add(KEY)  # its record waits for the next flush
    a.settle([], {})
    assert b.busy_elsewhere(KEY) is True
    unwritten.clear()
    a.settle([], {})  # the flush that wrote it
    assert b.busy_elsewhere(KEY) is False


def test_a_stopped_instances_calls_end_with_it(limits: MakeLimits) -> None:
    gone = limits()
    a, b = ledger_of(gone, account(0)), ledger_of(limits(), account(0))
    assert a.reserve(KEY, 0, MAY) == 0
    assert b.busy_elsewhere(KEY) is True
    gone.close()
    assert b.busy_elsewhere(KEY) is False


def test_an_unreachable_redis_falls_back_to_the_instances_own_credits(redis_server: RedisServer) -> None:
    shared = RedisLimits(
        "unix:///nonexistent/orch-redis.sock", namespace=RedisServer.new_namespace(), retry_after_s=3600
    )
    try:
        with capture_logs() as logs:
            ledger = ledger_of(shared, account(2 * PRICE))
            assert [ledger.take_credits(KEY, PRICE, MAY) for _ in range(3)] == [True, True, False]
            ledger.give_credits(KEY, PRICE)
            assert ledger.take_credits(KEY, PRICE, MAY)
            assert ledger.reserve(KEY, 0, MAY) == 0
            assert ledger.busy_elsewhere(KEY) is None  # not known: the deletion asks this instance alone
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["redis.unreachable"]
    finally:
        shared.close()


# -- two instances, through the app ---------------------------------------------------------------------------------


@dataclass
class Instance:
    runtime: Runtime
    admin: httpx.AsyncClient
    anon: httpx.AsyncClient


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    async with engine_in_process(MODEL, max_tokens=8, max_model_len=4096) as e:
        yield e


@pytest.fixture
async def instances(tmp_path: Path, database_url: str, redis_server: RedisServer) -> AsyncIterator[list[Instance]]:
    """Two instances (as two processes would be) on one database and one Redis."""
    namespace = RedisServer.new_namespace()
    async with AsyncExitStack() as stack:
        made = []
        for name in ("a", "b"):
            settings = instance_settings(tmp_path / name, database_url).model_copy(
                update={"redis_url": redis_server.url, "deployment": namespace}
            )
            runtime = Runtime(build_deps(settings))
            await runtime.start()
            stack.push_async_callback(runtime.deps.engine.dispose)
            stack.push_async_callback(runtime.stop)
            transport = httpx.ASGITransport(app=create_app(runtime))
            base = "http://testserver"
            admin = httpx.AsyncClient(
                transport=transport, base_url=base, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
            )
            anon = httpx.AsyncClient(transport=transport, base_url=base)
            stack.push_async_callback(admin.aclose)
            stack.push_async_callback(anon.aclose)
            made.append(Instance(runtime, admin, anon))
        yield made


async def ready_on_both(instances: list[Instance], engine: Engine) -> None:
    a, b = instances
    await make_ready(a.admin, a.runtime.deps, MODEL, engine.chat_url)
    await b.runtime.deps.catalog.reload()  # as the change feed (or the periodic refresh) would


async def test_concurrent_calls_over_two_instances_cannot_spend_the_same_credits(
    instances: list[Instance], engine: Engine
) -> None:
    a, b = instances
    await ready_on_both(instances, engine)
    _, key = await funded_key(a.admin, str(Decimal(3 * BODY_CREDITS) / UNIT))  # three calls' credits
    await b.runtime.deps.catalog.reload()
    headers = {"Authorization": key}
    answers = await asyncio.gather(*(i.anon.post(PATH, json=BODY, headers=headers) for i in [a, b] * 3))
    assert sorted(r.status_code for r in answers) == [200, 200, 200, 402, 402, 402]
    refused = [r.json() for r in answers if r.status_code == 402]
    assert refused == [{"success": False, "message": "Insufficient credits"}] * 3  # LlmEndpoint's own answer
    for instance in instances:
        await instance.runtime.deps.records.flush()
        await instance.runtime.deps.catalog.reload()
    assert (await b.anon.post(PATH, json=BODY, headers=headers)).status_code == 402


async def test_a_key_with_a_call_in_flight_on_another_instance_is_disabled_not_deleted(
    instances: list[Instance], engine: Engine
) -> None:
    a, b = instances
    await ready_on_both(instances, engine)
    key_id, key = await funded_key(a.admin, "1")
    await b.runtime.deps.catalog.reload()
    await engine.set_faults(hang=True)  # the call stays in flight on b
    call = asyncio.ensure_future(b.anon.post(PATH, json=BODY, headers={"Authorization": key}))
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not await engine.chats():
            assert loop.time() < deadline, "the call never reached the engine"
            await asyncio.sleep(0.02)
        r = await a.admin.post("/api/v1/delete_api_key", json={"user_id": "llm", "api_key_id": key_id})
        assert (r.status_code, r.json()) == (200, {"message": "API key disabled successfully"})
    finally:
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
        await engine.set_faults(hang=False)
    # A key no instance is using is deleted as before.
    other_id, _ = await funded_key(a.admin, "1", user="other")
    r = await a.admin.post("/api/v1/delete_api_key", json={"user_id": "other", "api_key_id": other_id})
    assert (r.status_code, r.json()) == (200, {"message": "API key deleted successfully"})
