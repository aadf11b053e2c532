"""SQL of the fleet: models, replicas, their security rules and their lifecycle events, and every move of a
replica's status (checked against the lifecycle's table, and recorded as an event in the same transaction). One
method is one transaction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, exists, func, insert, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlmodel.sql.expression import SelectOfScalar

from orchestrator.domain.errors import Conflict, NotFound
from orchestrator.domain.lifecycle import DELETABLE, ReplicaStatus, check_move
from orchestrator.store.listing import Page, found, paged
from orchestrator.store.tables import (
    GroupModel,
    KeyModel,
    LlmModel,
    Replica,
    ReplicaEvent,
    ReplicaSecurityRule,
    row_id,
    storable,
    utcnow,
)

_ENDING = frozenset({ReplicaStatus.DRAINING, ReplicaStatus.TERMINATING, ReplicaStatus.TERMINATED})
_BY_ADMIN = "deletion requested by an admin"


@dataclass(frozen=True)
class ReplicaDetail:
    replica: Replica
    model_name: str
    rules: Sequence[ReplicaSecurityRule]
    events: Sequence[ReplicaEvent]


class FleetStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    # -- models -----------------------------------------------------------------------------

    async def list_models(self, *, active_only: bool = False) -> Sequence[LlmModel]:
        query = live_models().order_by(col(LlmModel.id))
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
            return (await s.exec(live_models().where(col(LlmModel.name) == name))).first()

    async def model(self, model_id: int) -> LlmModel | None:
        async with self._sessions() as s:
            return (await s.exec(live_models().where(col(LlmModel.id) == model_id))).first()

    async def models_page(self, *, q: str | None, provider: str | None, limit: int, offset: int) -> Page[LlmModel]:
        query = live_models().order_by(col(LlmModel.id).desc())
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
            model = (await s.exec(live_models().where(col(LlmModel.id) == model_id))).first()
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
            model = (await s.exec(live_models().where(col(LlmModel.id) == model_id))).first()
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

    async def create_replica(
        self,
        replica: Replica,
        rules: Sequence[ReplicaSecurityRule],
        message: str,
        notes: Sequence[tuple[str, str]] = (),
    ) -> int:
        """Insert a PENDING replica, its desired rules, its first event and its `notes` (events that are not
        moves, as (reason, message), after the first) in one transaction."""
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
            await s.flush()  # the creation's event first, by id, as the detail lists them
            for reason, note in notes:
                s.add(
                    ReplicaEvent(
                        replica_id=replica.id,
                        from_status=ReplicaStatus.PENDING,
                        to_status=ReplicaStatus.PENDING,
                        reason=reason,
                        message=note,
                    )
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

    async def delete_replica(self, replica_id: int, reason: str, message: str = _BY_ADMIN) -> None:
        async with self._sessions() as s:
            replica = (await s.exec(_live_replicas().where(col(Replica.id) == replica_id))).first()
            if replica is None:
                raise NotFound("Replica not found")
            await _request_deletion(s, replica, reason, message)
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

    async def note_probe(
        self,
        replica_id: int,
        status: ReplicaStatus,
        *,
        probe_error: str | None,
        probe_error_since: datetime | None,
        ready_deadline: datetime | None,
    ) -> bool:
        """What the health probe found, written only while the replica is still in the `status` it was probed in
        (a replica moved meanwhile keeps what its move wrote). False if it had moved."""
        async with self._sessions() as s:
            result = await s.exec(
                update(Replica)
                .where(col(Replica.id) == replica_id, col(Replica.status) == status)
                .values(
                    probe_error=storable(probe_error),
                    probe_error_since=probe_error_since,
                    ready_deadline=ready_deadline,
                )
            )
            await s.commit()
            return _rowcount(result) == 1

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


def live_models() -> SelectOfScalar[LlmModel]:
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


async def _request_deletion(s: AsyncSession, replica: Replica, reason: str, message: str = _BY_ADMIN) -> None:
    """Mark the replica deleted and start draining it; statuses already on the way out stay."""
    assert replica.id is not None
    status = ReplicaStatus(replica.status)
    replica.delete_requested_at = utcnow()
    s.add(replica)
    await s.flush()
    if status in DELETABLE:
        await _move(s, replica.id, status, ReplicaStatus.DRAINING, reason=reason, message=message)
