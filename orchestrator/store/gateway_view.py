"""SQL of what the gateway serves from memory, read in one go: live models, READY replicas, every key with its
model bindings, credit rates, external endpoints, and the models whose deployment may be at zero replicas."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from orchestrator.domain.lifecycle import ReplicaStatus
from orchestrator.store.fleet import live_models
from orchestrator.store.tables import (
    ApiKey,
    CreditRate,
    Deployment,
    ExternalEndpoint,
    GroupModel,
    KeyModel,
    LlmModel,
    Replica,
    row_id,
)


@dataclass(frozen=True)
class RouteRow:
    replica_id: int
    model: str
    endpoint: str
    rate_limit: int | None
    engine_key_sealed: str | None


@dataclass(frozen=True)
class GatewayView:
    models: Sequence[LlmModel]
    ready: Sequence[RouteRow]
    keys: Sequence[ApiKey]
    key_models: Sequence[tuple[int, int]]
    """(key id, model id) bindings."""
    group_models: Sequence[tuple[int, int]]
    """(group id, model id) bindings."""
    rates: Sequence[CreditRate]
    endpoints: Sequence[ExternalEndpoint]
    waking: frozenset[str]
    """Models whose deployment's autoscaling may leave them no replica: a call for one waits for a replica to start
    (in the priority queue) rather than being refused at once."""


class GatewayViewStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def read(self) -> GatewayView:
        ready = (
            select(Replica, col(LlmModel.name))
            .join(LlmModel, col(LlmModel.id) == col(Replica.model_id))
            .where(
                col(Replica.status) == ReplicaStatus.READY,
                col(Replica.endpoint).is_not(None),
                col(Replica.delete_requested_at).is_(None),
                col(LlmModel.deleted_at).is_(None),
            )
            .order_by(col(Replica.id))
        )
        async with self._sessions() as s:
            models = (await s.exec(live_models())).all()
            rows = (await s.exec(ready)).all()
            keys = (await s.exec(select(ApiKey))).all()
            key_models = (await s.exec(select(col(KeyModel.key_id), col(KeyModel.model_id)))).all()
            group_models = (await s.exec(select(col(GroupModel.group_id), col(GroupModel.model_id)))).all()
            rates = (await s.exec(select(CreditRate))).all()
            endpoints = (await s.exec(select(ExternalEndpoint).order_by(col(ExternalEndpoint.id)))).all()
            autoscaled = (
                await s.exec(
                    select(col(LlmModel.name), col(Deployment.autoscale))
                    .join(Deployment, col(Deployment.model_id) == col(LlmModel.id))
                    .where(
                        col(Deployment.deleted_at).is_(None),
                        col(LlmModel.deleted_at).is_(None),
                        col(Deployment.autoscale).is_not(None),
                    )
                )
            ).all()
        return GatewayView(
            models=models,
            ready=[
                RouteRow(row_id(r.id), name, r.endpoint or "", r.rate_limit, r.engine_key_sealed) for r, name in rows
            ],
            keys=keys,
            key_models=key_models,
            group_models=group_models,
            rates=rates,
            endpoints=endpoints,
            waking=frozenset(name for name, policy in autoscaled if _from_zero(policy)),
        )


def _from_zero(policy: str | None) -> bool:
    try:
        return bool(policy) and json.loads(policy or "{}").get("min_replicas") == 0
    except (ValueError, AttributeError):  # not the JSON object the API wrote: it does not wake anything
        return False
