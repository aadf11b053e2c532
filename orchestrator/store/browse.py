"""SQL of the table browser (the toolkit's `/tables`): every table's newest rows, secret columns redacted."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Table
from sqlalchemy import select as core_select
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from orchestrator.domain.errors import NotFound

REDACTED = "<redacted>"
BROWSE_LIMIT = 100


class TableBrowser:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    @staticmethod
    def names() -> list[str]:
        return sorted(SQLModel.metadata.tables)

    async def rows(self, name: str) -> list[dict[str, Any]]:
        table = SQLModel.metadata.tables.get(name)
        if table is None:
            raise NotFound("Detail not found")
        newest_first = [c.desc() for c in table.primary_key.columns]  # `id` for most; `model` for credit_rate
        query = core_select(table).order_by(*newest_first).limit(BROWSE_LIMIT)
        async with self._sessions() as s:
            conn = await s.connection()
            return [_redact(table, row) for row in (await conn.execute(query)).mappings()]


def _redact(table: Table, row: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for column in table.columns:
        value = row[column.name]
        if column.info.get("secret") and value is not None:
            value = REDACTED
        elif isinstance(value, datetime):
            value = value.isoformat()
        out[column.name] = value
    return out
