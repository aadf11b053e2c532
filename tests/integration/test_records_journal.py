"""The record writer with its journal against a real database: a batch whose commit went through but whose answer
was lost (the connection dropped at the commit) is not written twice, and the writer does not fail forever."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from orchestrator.billing.journal import Journal
from orchestrator.billing.records import CallRecord, CallRecords
from orchestrator.runtime.container import Deps
from orchestrator.store.call_records import BatchConflict, RecordStore
from orchestrator.store.db import make_sessions
from orchestrator.store.tables import Metric


class CommitAnswerLost(RecordStore):
    """A database whose first commit of a batch lands, but whose answer never reaches us."""

    lost = 0

    async def write_calls(self, *args: Any, **kwargs: Any) -> Any:
        fresh = await super().write_calls(*args, **kwargs)
        if not self.lost:
            self.lost += 1
            raise ConnectionResetError("the connection dropped at the commit")
        return fresh


def call(key_id: int, fee: int) -> CallRecord:
    return CallRecord(
        key_id=key_id, model="m", kind="chat", request=b'{"messages":[]}', answer=b"{}", stream=False, session=None,
        created=time.time(), duration=0.01, first_byte=None, replica_id=None, status=200, prompt_tokens=1,
        completion_tokens=1, total_tokens=2, price_in=0, price_out=0, fee=fee,
    )  # fmt: skip


async def test_a_batch_whose_commit_answer_was_lost_is_written_once(deps: Deps, tmp_path: Path) -> None:
    key = await deps.api_keys.issue("payer")
    records = CallRecords(
        CommitAnswerLost(make_sessions(deps.engine)), deps.catalog.ledger, Journal(tmp_path / "journal", CallRecord)
    )
    try:
        for _ in range(3):
            await records.add(call(key.id, 100))  # type: ignore[misc]
        with pytest.raises(ConnectionResetError):
            await records.flush()  # written, but this process cannot know
        await records.add(call(key.id, 10))  # type: ignore[misc]  # a call made meanwhile
        with pytest.raises(BatchConflict):
            await records.flush()  # its first segment is marked written already: found out, not written twice
        assert await records.flush() == 1  # what is left
        assert len(records) == 0
    finally:
        records.close()
    async with deps.engine.connect() as conn:
        rows = (await conn.execute(select(func.count()).select_from(Metric))).scalar_one()  # type: ignore[arg-type]
    assert rows == 4
    assert (await deps.accounts.key(key.id)).total_fee == 3 * 100 + 10
    assert list((tmp_path / "journal").glob("*.seg")) == []
