"""SQL of the toolkit's client API keys: issue, and remove (delete, or disable a key whose calls are recorded or
not yet written). One method is one transaction."""

from __future__ import annotations

from enum import Enum

from sqlalchemy import exists
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from orchestrator.domain.errors import Conflict, NotFound
from orchestrator.store.tables import ApiKey, Metric


class KeyRemoval(Enum):
    DELETED = "deleted"
    DISABLED = "disabled"


class ApiKeyStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def create_api_key(self, key: ApiKey) -> ApiKey:
        async with self._sessions() as s:
            s.add(key)
            await s.commit()
        return key

    async def remove_api_key(self, user_id: str, key_id: int, *, in_use: bool = False) -> KeyRemoval:
        """Delete a key, or disable it when usage rows refer to it (they stay attributable) or when it has calls
        not yet written (`in_use`)."""
        async with self._sessions() as s:
            key = (await s.exec(select(ApiKey).where(col(ApiKey.id) == key_id, col(ApiKey.user_id) == user_id))).first()
            if key is None:
                raise NotFound("API key not found for the given user_id and api_key_id")
            if not key.enabled:
                raise Conflict("API key already disabled")
            used = in_use or (await s.exec(select(exists().where(col(Metric.api_key_id) == key_id)))).one()
            if used:
                key.enabled = False
                outcome = KeyRemoval.DISABLED
            else:
                await s.delete(key)
                outcome = KeyRemoval.DELETED
            await s.commit()
            return outcome
