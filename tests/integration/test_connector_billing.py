"""Billing on every gateway call: quota first, then balance, "Please recharge." when both are spent, the month
rolling over, and charges that stay exact when many calls, flushes and recharges race on PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from api.app import create_app
from orchestrator.domain.money import UNIT, month_of
from orchestrator.runtime.compose import Runtime, build_deps
from orchestrator.runtime.container import Deps
from orchestrator.store.tables import ApiKey, Metric
from tests.support.billing import CHAT, PRICE_IN, PRICE_OUT, connector_key, engine, priced_model
from tests.support.engines import Engine
from tests.support.postgres import PostgresServer
from tests.support.settings import ADMIN_KEY, instance_settings

__all__ = ["engine"]  # the fixture, from tests/support/billing.py


async def chat(client: httpx.AsyncClient, key: str, session: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    if session:
        headers["Session-Id"] = session
    return await client.post("/v1/chat/completions", json=CHAT, headers=headers)


def fee_of(answer: httpx.Response) -> int:
    """The fee of a call in money units, from the usage the engine reported."""
    usage = answer.json()["usage"]
    return int(
        usage["prompt_tokens"] * PRICE_IN * UNIT // 10**6 + usage["completion_tokens"] * PRICE_OUT * UNIT // 10**6
    )


async def key_row(deps: Deps, key_id: int) -> ApiKey:
    return await deps.accounts.key(key_id)


async def test_quota_first_then_balance_then_please_recharge(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, engine: Engine
) -> None:
    model_id = await priced_model(client, deps, engine)
    probe_id, probe = await connector_key(client, model_id, month_quota=1, balance=0)
    one = fee_of(await chat(anon_client, probe))  # what one call costs here
    assert one > 0
    # Quota for 3.5 calls and balance for 1.25: a call passes while its worst case (its body's bytes and its
    # max_tokens at the prices) fits in what is left, so the key never goes below zero; then 402.
    key_id, key = await connector_key(client, model_id, month_quota=3.5 * one / UNIT, balance=1.25 * one / UNIT)
    quota, balance = round(3.5 * one), round(1.25 * one)
    passed = 0
    while (answer := await chat(anon_client, key)).status_code == 200:
        passed += 1
    assert answer.status_code == 402  # before any flush: the gateway counts what it has not written yet
    assert answer.json()["error"]["message"] == "Please recharge."
    assert 2 <= passed <= 4
    await deps.records.flush()
    row = await key_row(deps, key_id)
    assert row.month_fee == min(quota, passed * one)  # the quota is used first...
    assert row.balance == balance - max(0, passed * one - quota) >= 0  # ...then the balance, never below zero
    assert row.total_fee == passed * one
    assert row.fee_month == month_of()
    r = await client.post("/admin/api-key/recharge", json={"id": key_id, "balance": 1})
    assert r.json()["data"]["balance"] == pytest.approx((row.balance + UNIT) / UNIT)
    assert (await chat(anon_client, key)).status_code == 200
    await deps.records.flush()
    threads = (await client.get(f"/admin/thread/list?key_id={key_id}&limit=100")).json()["data"]
    assert threads["total"] == passed + 1
    assert sum(round(t["fee"] * UNIT) for t in threads["items"]) == (await key_row(deps, key_id)).total_fee
    assert probe_id != key_id


async def test_a_new_month_starts_the_quota_again(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, engine: Engine
) -> None:
    model_id = await priced_model(client, deps, engine)
    key_id, key = await connector_key(client, model_id, month_quota=0.001, balance=0)
    last_month = month_of() - 1 if month_of() % 100 != 1 else month_of() - 89  # Dec of the year before
    async with deps.engine.begin() as conn:  # the quota was all spent, last month
        await conn.execute(
            update(ApiKey).where(ApiKey.id == key_id).values(month_fee=10**9, month_quota=10**9, fee_month=last_month)  # type: ignore[arg-type]
        )
    await deps.catalog.reload()
    answer = await chat(anon_client, key)
    assert answer.status_code == 200, answer.text
    await deps.records.flush()
    row = await key_row(deps, key_id)
    assert (row.month_fee, row.fee_month, row.balance) == (fee_of(answer), month_of(), 0)


async def test_fees_follow_the_model_prices_and_admin_calls_are_not_billed(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, engine: Engine
) -> None:
    model_id = await priced_model(client, deps, engine)
    key_id, key = await connector_key(client, model_id, month_quota=1)
    answer = await chat(anon_client, key)
    usage = answer.json()["usage"]
    assert (await chat(anon_client, ADMIN_KEY)).status_code == 200  # the server's admin key: every model, no bill
    await deps.records.flush()
    [thread] = (await client.get("/admin/thread/list")).json()["data"]["items"]
    detail = (await client.get(f"/admin/thread/detail/{thread['id']}")).json()["data"]
    expected = (usage["prompt_tokens"] * PRICE_IN + usage["completion_tokens"] * PRICE_OUT) / 10**6
    assert thread["fee"] == pytest.approx(expected, abs=1e-15)
    assert (detail["price_in"], detail["price_out"]) == (PRICE_IN / 10**6, PRICE_OUT / 10**6)
    assert (detail["tokens_in"], detail["tokens_out"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert (await key_row(deps, key_id)).total_fee == fee_of(answer)


# -- real concurrency: two gateway instances on one PostgreSQL database ------------------------------


@asynccontextmanager
async def instance(state_dir: Path, url: str) -> AsyncIterator[tuple[Deps, httpx.AsyncClient]]:
    """A whole server (its own gateway, ledger and record buffer) on a shared database; the client is admin."""
    deps = build_deps(instance_settings(state_dir, url))
    runtime = Runtime(deps)
    await runtime.start()
    transport = httpx.ASGITransport(app=create_app(runtime))
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=headers) as c:
            yield deps, c
    finally:
        await runtime.stop()


@pytest.mark.postgres
async def test_concurrent_calls_on_two_instances_charge_exactly(
    postgres: PostgresServer, tmp_path: Path, engine: Engine
) -> None:
    url = await postgres.new_database()
    calls, per_instance, recharges = 240, 12, 6
    async with instance(tmp_path / "a", url) as (deps_a, a), instance(tmp_path / "b", url) as (deps_b, b):
        model_id = await priced_model(a, deps_a, engine)
        await deps_b.catalog.reload()
        await deps_b.health.run()
        one = fee_of(await chat(a, ADMIN_KEY))
        # 240 calls spend the quota and part of the balance; every call's worst case fits, so none is refused.
        quota, balance = 40 * one, 1000 * one
        r = await a.post(
            "/admin/api-key/apply", json={"name": "racer", "month_quota": quota / UNIT, "balance": balance / UNIT}
        )
        key_id, key = r.json()["data"]["id"], r.json()["data"]["api_key"]
        await a.post("/admin/api-key/bind-or-unbind-model", json={"key_id": key_id, "model_id": model_id})
        await deps_b.catalog.reload()

        fees: list[int] = []
        stop = asyncio.Event()

        async def caller(c: httpx.AsyncClient, n: int) -> None:
            for i in range(n):
                answer = await chat(c, key, session=f"s{i % 3}")
                assert answer.status_code == 200, answer.text
                fees.append(fee_of(answer))

        async def flusher(deps: Deps) -> None:  # both instances write while calls and recharges go on
            while not stop.is_set():
                await deps.records.flush()
                await asyncio.sleep(0)

        async def recharger() -> None:
            for _ in range(recharges):
                r = await b.post("/admin/api-key/recharge", json={"id": key_id, "balance": one / UNIT})
                assert r.json()["success"], r.text

        flushers = [asyncio.create_task(flusher(d)) for d in (deps_a, deps_b)]
        per_caller = calls // (2 * per_instance)
        await asyncio.gather(
            *(caller(c, per_caller) for c in (a, b) for _ in range(per_instance)),
            recharger(),
        )
        stop.set()
        await asyncio.gather(*flushers)
        await deps_a.records.flush()
        await deps_b.records.flush()

        row = await key_row(deps_a, key_id)
        total = sum(fees)
        assert len(fees) == calls
        assert row.total_fee == total
        assert row.month_fee == quota
        assert row.balance == balance + recharges * one - (total - quota)
        async with deps_a.engine.connect() as conn:
            rows = (await conn.execute(Metric.__table__.select().where(Metric.api_key_id == key_id))).mappings().all()  # type: ignore[attr-defined]
        assert len(rows) == calls
        assert sum(r["fee"] for r in rows) == total
        sessions = (await a.get(f"/admin/session/list?key_id={key_id}")).json()["data"]["items"]
        assert sorted(s["key"] for s in sessions) == ["s0", "s1", "s2"]
        assert sum(round(s["total_fee"] * UNIT) for s in sessions) == total
        payments = (await a.get(f"/admin/payment/list?key_id={key_id}")).json()["data"]
        assert payments["total"] == recharges
