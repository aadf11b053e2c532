"""The records flush shares the event loop with the gateway's calls: it reads a batch in slices, letting the loop
go between them, and writes the rows in several statements, every call once, on both databases."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sqlalchemy import func, select

from orchestrator.billing.records import BATCH_SLICE, CallRecord, CallRecords
from orchestrator.runtime.container import Deps
from orchestrator.store.call_records import INSERT_SLICE, RecordStore
from orchestrator.store.db import make_sessions
from orchestrator.store.tables import ChatSession, Metric, table_of

CALLS = 2 * INSERT_SLICE + 50


def call(key_id: int, n: int) -> CallRecord:
    request = b'{"messages":[{"role":"user","content":"q%d"}]}' % n
    answer = b'{"choices":[{"index":0,"message":{"content":"a%d"}}]}' % n
    return CallRecord(
        key_id=key_id, model="m", kind="chat", request=request, answer=answer, stream=False, session="s",
        created=time.time(), duration=0.01, first_byte=None, replica_id=None, status=200, prompt_tokens=1,
        completion_tokens=2, total_tokens=3, price_in=0, price_out=0, fee=5,
    )  # fmt: skip


class Ticks:
    """Counts the turns another task gets on the event loop."""

    def __init__(self) -> None:
        self.count = 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(0)
            self.count += 1


class SeesTicks(RecordStore):
    """A real store that notes how often the loop went elsewhere before the batch reached it."""

    def __init__(self, ticks: Ticks, *args: Any) -> None:
        super().__init__(*args)
        self.ticks = ticks
        self.at_write: list[int] = []

    async def write_calls(self, *args: Any, **kwargs: Any) -> Any:
        self.at_write.append(self.ticks.count)
        return await super().write_calls(*args, **kwargs)


async def test_a_batch_is_read_in_slices_and_written_whole(deps: Deps) -> None:
    key = await deps.api_keys.issue("payer")
    ticks = Ticks()
    store = SeesTicks(ticks, make_sessions(deps.engine))
    records = CallRecords(store, deps.catalog.ledger)  # no journal: nothing else awaits before the write
    for n in range(CALLS):
        records.add(call(key.id, n))
    ticker = asyncio.create_task(ticks.run())
    try:
        await asyncio.sleep(0)
        before = ticks.count
        assert await records.flush() == CALLS
    finally:
        ticker.cancel()
    # The loop went elsewhere between the slices of the batch, before a row was written.
    assert store.at_write[0] - before >= CALLS // BATCH_SLICE - 1
    metric, sessions = table_of(Metric), table_of(ChatSession)
    async with deps.engine.connect() as conn:
        rows = (await conn.execute(select(metric.c.prompt).order_by(metric.c.id))).scalars().all()
        session = (await conn.execute(select(sessions.c.total_fee, sessions.c.title))).one()
        count = (await conn.execute(select(func.count()).select_from(metric))).scalar_one()
    assert count == CALLS
    assert rows == [f"q{n}" for n in range(CALLS)]  # every call once, in order, across the statements
    assert tuple(session) == (5 * CALLS, f"a{CALLS - 1}")
    assert (await deps.accounts.key(key.id)).total_fee == 5 * CALLS
