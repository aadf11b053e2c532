"""Usage records of gateway calls: appended in memory on the hot path, written in batches by a job."""

from __future__ import annotations

from typing import Any

from orchestrator.store import Store

MAX_BUFFERED = 100_000  # beyond this the database is down for long; keep the newest rather than grow forever


class UsageBuffer:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._rows: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        """A `metric` row as column -> value; no ORM object is built on the hot path."""
        self._rows.append(row)
        if len(self._rows) > MAX_BUFFERED:
            del self._rows[: len(self._rows) - MAX_BUFFERED]

    def __len__(self) -> int:
        return len(self._rows)

    async def flush(self) -> int:
        """Write what is buffered; on failure the rows stay for the next flush."""
        if not self._rows:
            return 0
        rows, self._rows = self._rows, []
        try:
            await self._store.insert_usage(rows)
        except BaseException:  # failed or cancelled (shutdown): the rows wait for the next flush
            self._rows[:0] = rows
            raise
        return len(rows)
