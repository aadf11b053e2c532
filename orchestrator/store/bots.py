"""SQL of the chat bots: their rows, whether the key a bot chats as exists, and the events each has taken (so a
redelivered event is answered once)."""

from __future__ import annotations

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from orchestrator.domain.errors import Conflict, NotFound
from orchestrator.store.listing import Page, found, paged
from orchestrator.store.tables import ApiKey, BotConnector, BotEvent, utcnow


class BotStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def bots(self, *, q: str | None, limit: int, offset: int) -> Page[BotConnector]:
        query = select(BotConnector).order_by(col(BotConnector.id).desc())
        if q:
            query = query.where(found(q, col(BotConnector.name), col(BotConnector.provider)))
        async with self._sessions() as s:
            return await paged(s, query, limit, offset)

    async def bot(self, bot_id: int) -> BotConnector:
        async with self._sessions() as s:
            bot = await s.get(BotConnector, bot_id)
        if bot is None:
            raise NotFound(f"bot {bot_id} is not found")
        return bot

    async def bot_named(self, name: str, provider: str) -> BotConnector | None:
        async with self._sessions() as s:
            query = select(BotConnector).where(col(BotConnector.name) == name, col(BotConnector.provider) == provider)
            return (await s.exec(query)).first()

    async def save(self, bot: BotConnector) -> BotConnector:
        name, provider = bot.name, bot.provider  # read before a failed commit leaves the session unusable
        async with self._sessions() as s:
            bot.updated_at = utcnow()
            bot = await s.merge(bot)
            try:
                await s.commit()
            except IntegrityError as e:
                raise Conflict(f"{name}@[{provider}] already exists") from e
            await s.refresh(bot)
            return bot

    async def delete(self, bot_id: int) -> None:
        async with self._sessions() as s:
            bot = await s.get(BotConnector, bot_id)
            if bot is None:
                raise NotFound(f"bot {bot_id} is not found")
            await s.exec(delete(BotEvent).where(col(BotEvent.bot_id) == bot_id))
            await s.delete(bot)
            await s.commit()

    async def key_exists(self, key_hash: str) -> bool:
        async with self._sessions() as s:
            query = select(col(ApiKey.id)).where(col(ApiKey.key_hash) == key_hash, col(ApiKey.enabled))
            return (await s.exec(query)).first() is not None

    async def take_event(self, bot_id: int, event_id: str) -> bool:
        """True the first time this bot sees `event_id`; False for a redelivery (on any instance)."""
        async with self._sessions() as s:
            s.add(BotEvent(bot_id=bot_id, event_id=event_id))
            try:
                await s.commit()
            except IntegrityError:
                return False
        return True
