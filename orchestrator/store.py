"""The store: every SQL statement of the orchestrator. One method is one transaction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from sqlalchemy import Table, delete, exists, func, insert, update
from sqlalchemy import select as core_select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import SQLModel, col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlmodel.sql.expression import SelectOfScalar

from orchestrator.errors import Conflict, NotFound
from orchestrator.lifecycle import DELETABLE, ReplicaStatus, check_move
from orchestrator.listing import Page, found, paged
from orchestrator.tables import (
    ApiKey,
    CreditRate,
    GroupModel,
    KeyModel,
    LlmEndpoint,
    LlmModel,
    Metric,
    Replica,
    ReplicaEvent,
    ReplicaSecurityRule,
    row_id,
    utcnow,
)

REDACTED = "<redacted>"
_ENDING = frozenset({ReplicaStatus.DRAINING, ReplicaStatus.TERMINATING, ReplicaStatus.TERMINATED})
BROWSE_LIMIT = 100


class KeyRemoval(Enum):
    DELETED = "deleted"
    DISABLED = "disabled"


@dataclass(frozen=True)
class ReplicaDetail:
    replica: Replica
    model_name: str
    rules: Sequence[ReplicaSecurityRule]
    events: Sequence[ReplicaEvent]


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
    endpoints: Sequence[LlmEndpoint]


class Store:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    # -- models -----------------------------------------------------------------------------

    async def list_models(self, *, active_only: bool = False) -> Sequence[LlmModel]:
        query = _live_models().order_by(col(LlmModel.id))
        if active_only:
            query = query.where(
                exists().where(
                    col(Replica.model_id) == col(LlmModel.id),
                    col(Replica.status) == ReplicaStatus.READY,
                )
            )
        async with self._sessions() as s:
            return (await s.exec(query)).all()

    async def model_by_name(self, name: str) -> LlmModel | None:
        async with self._sessions() as s:
            return (await s.exec(_live_models().where(col(LlmModel.name) == name))).first()

    async def model(self, model_id: int) -> LlmModel | None:
        async with self._sessions() as s:
            return (await s.exec(_live_models().where(col(LlmModel.id) == model_id))).first()

    async def models_page(self, *, q: str | None, provider: str | None, limit: int, offset: int) -> Page[LlmModel]:
        query = _live_models().order_by(col(LlmModel.id).desc())
        if q:
            query = query.where(found(q, col(LlmModel.name)))
        if provider:
            query = query.where(col(LlmModel.provider) == provider)
        async with self._sessions() as s:
            return await paged(s, query, limit, offset)

    async def create_model(self, model: LlmModel) -> LlmModel:
        async with self._sessions() as s:
            s.add(model)
            try:
                await s.commit()
            except IntegrityError as e:  # the partial unique index: a concurrent create won
                raise Conflict("Model already exists.") from e
        return model

    async def update_model(self, model_id: int, changes: dict[str, Any]) -> LlmModel:
        async with self._sessions() as s:
            model = (await s.exec(_live_models().where(col(LlmModel.id) == model_id))).first()
            if model is None:
                raise NotFound("Model not found")
            for name, value in changes.items():
                setattr(model, name, value)
            model.updated_at = utcnow()
            s.add(model)
            try:
                await s.commit()
            except IntegrityError as e:
                raise Conflict("Model already exists.") from e
            return model

    async def delete_model(self, model_id: int, reason: str) -> list[int]:
        """Hide the model, drop its bindings to keys and groups, and send each of its live replicas on its way
        out; returns their ids."""
        async with self._sessions() as s:
            model = (await s.exec(_live_models().where(col(LlmModel.id) == model_id))).first()
            if model is None:
                raise NotFound("Model not found")
            model.deleted_at = utcnow()
            await s.exec(delete(KeyModel).where(col(KeyModel.model_id) == model_id))
            await s.exec(delete(GroupModel).where(col(GroupModel.model_id) == model_id))
            replicas = (await s.exec(_live_replicas().where(col(Replica.model_id) == model_id))).all()
            for replica in replicas:
                await _request_deletion(s, replica, reason)
            await s.commit()
            return [r.id for r in replicas if r.id is not None]

    # -- replicas ---------------------------------------------------------------------------

    async def list_replicas(self, model_id: int) -> Sequence[Replica]:
        async with self._sessions() as s:
            query = _live_replicas().where(col(Replica.model_id) == model_id).order_by(col(Replica.id))
            return (await s.exec(query)).all()

    async def replica(self, replica_id: int) -> Replica | None:
        async with self._sessions() as s:
            return await s.get(Replica, replica_id)

    async def replica_detail(self, replica_id: int) -> ReplicaDetail | None:
        async with self._sessions() as s:
            replica = await s.get(Replica, replica_id)
            if replica is None:
                return None
            model = await s.get(LlmModel, replica.model_id)
            rules = (
                await s.exec(
                    select(ReplicaSecurityRule)
                    .where(col(ReplicaSecurityRule.replica_id) == replica_id)
                    .order_by(col(ReplicaSecurityRule.id))
                )
            ).all()
            events = (
                await s.exec(
                    select(ReplicaEvent)
                    .where(col(ReplicaEvent.replica_id) == replica_id)
                    .order_by(col(ReplicaEvent.id))
                )
            ).all()
            return ReplicaDetail(replica, model.name if model else "", rules, events)

    async def endpoint_in_use(self, model_id: int, endpoint: str) -> bool:
        query = (
            select(func.count())
            .select_from(Replica)
            .where(
                col(Replica.model_id) == model_id,
                col(Replica.endpoint) == endpoint,
                col(Replica.delete_requested_at).is_(None),
                col(Replica.status) != ReplicaStatus.TERMINATED,
            )
        )
        async with self._sessions() as s:
            return bool((await s.exec(query)).one())

    async def create_replica(self, replica: Replica, rules: Sequence[ReplicaSecurityRule], message: str) -> int:
        """Insert a PENDING replica, its desired rules and its first event in one transaction."""
        async with self._sessions() as s:
            replica.status = ReplicaStatus.PENDING
            s.add(replica)
            await s.flush()
            assert replica.id is not None
            for rule in rules:
                rule.replica_id = replica.id
                s.add(rule)
            s.add(
                ReplicaEvent(replica_id=replica.id, to_status=ReplicaStatus.PENDING, reason="created", message=message)
            )
            await s.commit()
            return replica.id

    async def set_rate_limit(self, replica_id: int, rate_limit: int) -> None:
        async with self._sessions() as s:
            result = await s.exec(
                update(Replica)
                .where(col(Replica.id) == replica_id, col(Replica.delete_requested_at).is_(None))
                .values(rate_limit=rate_limit)
            )
            if _rowcount(result) == 0:
                raise NotFound("Replica not found")
            await s.commit()

    async def delete_replica(self, replica_id: int, reason: str) -> None:
        async with self._sessions() as s:
            replica = (await s.exec(_live_replicas().where(col(Replica.id) == replica_id))).first()
            if replica is None:
                raise NotFound("Replica not found")
            await _request_deletion(s, replica, reason)
            await s.commit()

    async def replicas_with_model(self, statuses: Sequence[ReplicaStatus]) -> list[tuple[Replica, str]]:
        """Replicas in `statuses` with their model's name (what the engine serves), in one query."""
        query = (
            select(Replica, col(LlmModel.name))
            .join(LlmModel, col(LlmModel.id) == col(Replica.model_id))
            .where(col(Replica.status).in_(statuses))
            .order_by(col(Replica.id))
        )
        async with self._sessions() as s:
            return [(replica, name) for replica, name in (await s.exec(query)).all()]

    async def replica_with_model(self, replica_id: int) -> tuple[Replica, str] | None:
        query = (
            select(Replica, col(LlmModel.name))
            .join(LlmModel, col(LlmModel.id) == col(Replica.model_id))
            .where(col(Replica.id) == replica_id)
        )
        async with self._sessions() as s:
            row = (await s.exec(query)).first()
            return None if row is None else (row[0], row[1])

    async def count_replicas_by_status(self) -> dict[str, int]:
        query = select(col(Replica.status), func.count()).group_by(col(Replica.status))
        async with self._sessions() as s:
            return {status: int(n) for status, n in (await s.exec(query)).all()}

    async def replicas_in(self, statuses: Sequence[ReplicaStatus]) -> Sequence[Replica]:
        async with self._sessions() as s:
            query = select(Replica).where(col(Replica.status).in_(statuses)).order_by(col(Replica.id))
            return (await s.exec(query)).all()

    async def move(
        self,
        replica_id: int,
        src: ReplicaStatus,
        dst: ReplicaStatus,
        reason: str,
        message: str | None = None,
        **changes: Any,
    ) -> bool:
        """Guarded transition: applies only if the replica is still in `src`; False if someone else moved it."""
        async with self._sessions() as s:
            moved = await _move(s, replica_id, src, dst, reason=reason, message=message, **changes)
            if moved and dst is ReplicaStatus.TERMINATED:
                # Nothing enforces a terminated replica's rules any more.
                await s.exec(delete(ReplicaSecurityRule).where(col(ReplicaSecurityRule.replica_id) == replica_id))
            await s.commit()
            return moved

    async def record(self, replica_id: int, reason: str, message: str | None = None) -> None:
        """An event that is not a move (a bootstrap step, re-applied rules): from and to are the current status."""
        async with self._sessions() as s:
            status = (await s.exec(select(col(Replica.status)).where(col(Replica.id) == replica_id))).first()
            if status is None:
                return
            s.add(
                ReplicaEvent(
                    replica_id=replica_id, from_status=status, to_status=status, reason=reason, message=message
                )
            )
            await s.commit()

    async def set_phase_rules(self, replica_id: int, rules: Sequence[ReplicaSecurityRule]) -> None:
        """Replace the orchestrator's rules of a replica (every origin but `user`) in one transaction."""
        async with self._sessions() as s:
            await s.exec(
                delete(ReplicaSecurityRule).where(
                    col(ReplicaSecurityRule.replica_id) == replica_id, col(ReplicaSecurityRule.origin) != "user"
                )
            )
            for rule in rules:
                s.add(rule)
            await s.commit()

    async def security_rules(self, replica_id: int) -> Sequence[ReplicaSecurityRule]:
        async with self._sessions() as s:
            query = select(ReplicaSecurityRule).where(col(ReplicaSecurityRule.replica_id) == replica_id)
            return (await s.exec(query.order_by(col(ReplicaSecurityRule.id)))).all()

    async def replica_statuses(self) -> dict[int, ReplicaStatus]:
        """The status of every replica row, by id."""
        async with self._sessions() as s:
            rows = (await s.exec(select(col(Replica.id), col(Replica.status)))).all()
            return {row_id(i): ReplicaStatus(status) for i, status in rows}

    # -- API keys ---------------------------------------------------------------------------

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

    # -- the gateway's in-memory view -------------------------------------------------------

    async def gateway_view(self) -> GatewayView:
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
            models = (await s.exec(_live_models())).all()
            rows = (await s.exec(ready)).all()
            keys = (await s.exec(select(ApiKey))).all()
            key_models = (await s.exec(select(col(KeyModel.key_id), col(KeyModel.model_id)))).all()
            group_models = (await s.exec(select(col(GroupModel.group_id), col(GroupModel.model_id)))).all()
            rates = (await s.exec(select(CreditRate))).all()
            endpoints = (await s.exec(select(LlmEndpoint).order_by(col(LlmEndpoint.id)))).all()
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
        )

    # -- table browser ----------------------------------------------------------------------

    @staticmethod
    def table_names() -> list[str]:
        return sorted(SQLModel.metadata.tables)

    async def table_rows(self, name: str) -> list[dict[str, Any]]:
        table = SQLModel.metadata.tables.get(name)
        if table is None:
            raise NotFound("Detail not found")
        newest_first = [c.desc() for c in table.primary_key.columns]  # `id` for most; `model` for credit_rate
        query = core_select(table).order_by(*newest_first).limit(BROWSE_LIMIT)
        async with self._sessions() as s:
            conn = await s.connection()
            return [_redact(table, row) for row in (await conn.execute(query)).mappings()]


def _live_models() -> SelectOfScalar[LlmModel]:
    return select(LlmModel).where(col(LlmModel.deleted_at).is_(None))


def _live_replicas() -> SelectOfScalar[Replica]:
    return select(Replica).where(col(Replica.delete_requested_at).is_(None))


def _rowcount(result: Any) -> int:
    return int(result.rowcount)


async def _move(
    s: AsyncSession,
    replica_id: int,
    src: ReplicaStatus,
    dst: ReplicaStatus,
    *,
    reason: str,
    message: str | None,
    **changes: Any,
) -> bool:
    check_move(src, dst)
    now = utcnow()
    if dst in _ENDING:
        # The first reason that sends a replica towards its end is why it ended ("deleted", "never_ready"...).
        changes.setdefault("termination_reason", func.coalesce(col(Replica.termination_reason), reason))
    result = await s.exec(
        update(Replica)
        .where(col(Replica.id) == replica_id, col(Replica.status) == src)
        .values(status=dst, status_changed_at=now, **changes)
    )
    if _rowcount(result) != 1:
        return False
    await s.exec(
        insert(ReplicaEvent).values(
            replica_id=replica_id, at=now, from_status=src, to_status=dst, reason=reason, message=message
        )
    )
    return True


async def _request_deletion(s: AsyncSession, replica: Replica, reason: str) -> None:
    """Mark the replica deleted and start draining it; statuses already on the way out stay."""
    assert replica.id is not None
    status = ReplicaStatus(replica.status)
    replica.delete_requested_at = utcnow()
    s.add(replica)
    await s.flush()
    if status in DELETABLE:
        await _move(
            s, replica.id, status, ReplicaStatus.DRAINING, reason=reason, message="deletion requested by an admin"
        )


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
