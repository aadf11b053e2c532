"""The calls as written, read back: the connector's chat sessions and threads (one thread per call made with a
client key), listed and opened for `/admin` and `/user`."""

from __future__ import annotations

from orchestrator.store.call_records import RecordStore
from orchestrator.store.listing import Page
from orchestrator.store.tables import ChatSession, Metric


class CallRecordService:
    def __init__(self, store: RecordStore) -> None:
        self._store = store

    async def sessions(self, *, key_id: int | None, q: str | None, limit: int, offset: int) -> Page[ChatSession]:
        """Newest first; `key_id` None: every key's."""
        return await self._store.sessions(key_id=key_id, q=q, limit=limit, offset=offset)

    async def session(self, session_id: int) -> ChatSession:
        """The session, or NotFound."""
        return await self._store.session(session_id)

    async def threads(
        self, *, key_id: int | None, session_id: int | None, q: str | None, limit: int, offset: int
    ) -> Page[Metric]:
        """Newest first, or in the order they happened within one session."""
        return await self._store.threads(key_id=key_id, session_id=session_id, q=q, limit=limit, offset=offset)

    async def thread(self, thread_id: int) -> Metric:
        """The thread, or NotFound (the server admin key's calls are usage rows, not threads)."""
        return await self._store.thread(thread_id)
