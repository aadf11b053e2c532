"""SQL of Moonshot's llm_endpoints: every row, one by id, an upsert by id, and a delete by id. One method is one
transaction."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from orchestrator.store.tables import ExternalEndpoint, table_of, utcnow

_KEPT_ON_OVERWRITE = frozenset({"id", "created_at"})


class ExternalEndpointStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def endpoints(self) -> Sequence[ExternalEndpoint]:
        async with self._sessions() as s:
            return (await s.exec(select(ExternalEndpoint).order_by(col(ExternalEndpoint.id)))).all()

    async def endpoint(self, endpoint_id: str) -> ExternalEndpoint | None:
        async with self._sessions() as s:
            return await s.get(ExternalEndpoint, endpoint_id)

    async def save(self, endpoint: ExternalEndpoint) -> None:
        """Insert the row, or overwrite every column but `created_at` of the row with its id.

        One statement (ON CONFLICT on both databases): two instances saving the same id never clash."""
        values = endpoint.model_dump()
        values["updated_at"] = utcnow()
        async with self._sessions() as s:
            conn = await s.connection()
            insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
            stmt = insert(table_of(ExternalEndpoint)).values(**values)
            overwrite = {name: stmt.excluded[name] for name in values if name not in _KEPT_ON_OVERWRITE}
            await conn.execute(stmt.on_conflict_do_update(index_elements=["id"], set_=overwrite))
            await s.commit()

    async def delete(self, endpoint_id: str) -> bool:
        """Whether a row with this id existed (and is now gone)."""
        table = table_of(ExternalEndpoint)
        async with self._sessions() as s:
            result = await (await s.connection()).execute(delete(table).where(table.c.id == endpoint_id))
            await s.commit()
        return result.rowcount > 0
