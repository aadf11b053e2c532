"""Registered models: create, look up, list, delete (which sends their replicas to teardown)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog

from orchestrator.domain.errors import NotFound
from orchestrator.domain.lifecycle import REASON_MODEL_DELETED
from orchestrator.store.fleet import FleetStore
from orchestrator.store.listing import Page
from orchestrator.store.tables import LlmModel

log = structlog.get_logger(__name__)


class ModelService:
    def __init__(self, store: FleetStore, nudge: Callable[[], None], on_change: Callable[[], Awaitable[None]]) -> None:
        self._store = store
        self._nudge = nudge
        self._on_change = on_change

    async def list(self, *, active_only: bool) -> Sequence[LlmModel]:
        return await self._store.list_models(active_only=active_only)

    async def by_id(self, model_id: int) -> LlmModel:
        model = await self._store.model(model_id)
        if model is None:
            raise NotFound("Model not found")
        return model

    async def get(self, name: str) -> LlmModel:
        model = await self._store.model_by_name(name)
        if model is None:
            raise NotFound("Model not found")
        return model

    async def create(self, name: str, **fields: Any) -> LlmModel:
        """A new model; `fields` are the connector's (provider, multiple, config, prices per token)."""
        model = await self._store.create_model(LlmModel(name=name, **fields))  # Conflict: the unique live name
        await self._on_change()
        log.info("model.created", model_id=model.id, model=name)
        return model

    async def update(self, model_id: int, changes: dict[str, Any]) -> LlmModel:
        model = await self._store.update_model(model_id, changes)
        await self._on_change()
        log.info("model.updated", model_id=model_id, fields=sorted(changes))
        return model

    async def page(self, *, q: str | None, provider: str | None, limit: int, offset: int) -> Page[LlmModel]:
        return await self._store.models_page(q=q, provider=provider, limit=limit, offset=offset)

    async def delete(self, model_id: int) -> None:
        replica_ids = await self._store.delete_model(model_id, REASON_MODEL_DELETED)
        await self._on_change()
        log.info("model.deleted", model_id=model_id, replicas_draining=replica_ids)
        if replica_ids:
            self._nudge()
