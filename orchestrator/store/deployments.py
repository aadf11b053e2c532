"""SQL of deployments: a model's desired replicas, and the replicas each has made as its keeper reads them. One
method is one transaction; a deployment's replicas are drained through `FleetStore` (one replica, one move)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlmodel.sql.expression import SelectOfScalar

from orchestrator.domain.errors import Conflict, NotFound
from orchestrator.domain.lifecycle import ReplicaStatus
from orchestrator.domain.rollout import GONE
from orchestrator.store.tables import Deployment, LlmModel, Replica, ReplicaEvent, row_id, utcnow


@dataclass(frozen=True)
class MemberRow:
    """One replica a deployment made, as its keeper needs it."""

    id: int
    status: ReplicaStatus
    generation: int
    first_ready_at: datetime | None
    """Its first move to READY; None if it never reached READY."""
    ended_at: datetime | None
    """Its first move to DRAINING, TERMINATING or TERMINATED: when it stopped serving; None while alive."""
    termination_reason: str | None
    created_at: datetime

    @property
    def ever_ready(self) -> bool:
        return self.first_ready_at is not None


class DeploymentStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def live(self, model_id: int) -> Deployment | None:
        async with self._sessions() as s:
            return (await s.exec(_live().where(col(Deployment.model_id) == model_id))).first()

    async def all_live(self) -> Sequence[Deployment]:
        async with self._sessions() as s:
            return (await s.exec(_live().order_by(col(Deployment.id)))).all()

    async def put(self, model_id: int, fields: dict[str, Any]) -> Deployment:
        """Create the model's live deployment with `fields`, or change the one it has."""
        async with self._sessions() as s:
            model = (
                await s.exec(select(LlmModel).where(col(LlmModel.id) == model_id, col(LlmModel.deleted_at).is_(None)))
            ).first()
            if model is None:
                raise NotFound("Model not found")
            deployment = (await s.exec(_live().where(col(Deployment.model_id) == model_id))).first()
            if deployment is None:
                deployment = Deployment(model_id=model_id, **fields)
            else:
                for name, value in fields.items():
                    setattr(deployment, name, value)
                deployment.updated_at = utcnow()
            s.add(deployment)
            try:
                await s.commit()
            except IntegrityError as e:  # the partial unique index: a concurrent PUT made it first
                raise Conflict("The model's deployment was changed at the same time; try again.") from e
            await s.refresh(deployment)
            return deployment

    async def delete(self, model_id: int) -> Deployment:
        """Stop keeping the model's deployment (its row stays, for its replicas' audit)."""
        async with self._sessions() as s:
            deployment = (await s.exec(_live().where(col(Deployment.model_id) == model_id))).first()
            if deployment is None:
                raise NotFound("Deployment not found")
            deployment.deleted_at = deployment.updated_at = utcnow()
            s.add(deployment)
            await s.commit()
            await s.refresh(deployment)
            return deployment

    async def note(self, deployment_id: int, *, status: str, message: str | None, desired: int) -> bool:
        """Write what the keeper decided, only if it differs from what is stored; True if it did."""
        async with self._sessions() as s:
            result = await s.exec(
                update(Deployment)
                .where(
                    col(Deployment.id) == deployment_id,
                    or_(
                        col(Deployment.status) != status,
                        col(Deployment.message).is_distinct_from(message),
                        col(Deployment.desired) != desired,
                    ),
                )
                .values(status=status, message=message, desired=desired, updated_at=utcnow())
            )
            await s.commit()
            return int(result.rowcount) == 1

    async def members(self, deployment_id: int, since: datetime) -> list[MemberRow]:
        """The deployment's replicas still alive, and the ended ones made since `since` (the failures that count)."""

        def first_move(*to: ReplicaStatus) -> Any:
            return (
                select(func.min(col(ReplicaEvent.at)))
                .where(col(ReplicaEvent.replica_id) == col(Replica.id), col(ReplicaEvent.to_status).in_(to))
                .scalar_subquery()
            )

        query = (
            select(Replica, first_move(ReplicaStatus.READY), first_move(*GONE))
            .where(*_members_of(deployment_id, since))
            .order_by(col(Replica.id))
        )
        async with self._sessions() as s:
            rows = (await s.exec(query)).all()
        return [
            MemberRow(
                id=row_id(r.id),
                status=ReplicaStatus(r.status),
                generation=r.deployment_generation or 0,
                first_ready_at=ready_at,
                ended_at=ended_at,
                termination_reason=r.termination_reason,
                created_at=r.created_at,
            )
            for r, ready_at, ended_at in rows
        ]

    async def replicas(self, deployment_id: int, since: datetime) -> Sequence[Replica]:
        """The rows of the replicas `members` names, for the admin's view."""
        query = select(Replica).where(*_members_of(deployment_id, since)).order_by(col(Replica.id))
        async with self._sessions() as s:
            return (await s.exec(query)).all()

    async def orphans(self) -> list[int]:
        """Live replicas of deployments no longer kept (deleted, or their model deleted): theirs to drain."""
        query = (
            select(col(Replica.id))
            .join(Deployment, col(Deployment.id) == col(Replica.deployment_id))
            .where(
                col(Deployment.deleted_at).is_not(None),
                col(Replica.delete_requested_at).is_(None),
                col(Replica.status) != ReplicaStatus.TERMINATED,
            )
            .order_by(col(Replica.id))
        )
        async with self._sessions() as s:
            return [row_id(i) for i in (await s.exec(query)).all()]

    async def forget_deleted_models(self) -> list[int]:
        """Deployments whose model was deleted are deleted too; returns their ids."""
        async with self._sessions() as s:
            query = (
                _live()
                .join(LlmModel, col(LlmModel.id) == col(Deployment.model_id))
                .where(col(LlmModel.deleted_at).is_not(None))
            )
            gone = (await s.exec(query)).all()
            for deployment in gone:
                deployment.deleted_at = utcnow()
                s.add(deployment)
            await s.commit()
            return [row_id(d.id) for d in gone]


def _members_of(deployment_id: int, since: datetime) -> tuple[Any, ...]:
    """The deployment's replicas still alive, and the ended ones made since `since`."""
    return (
        col(Replica.deployment_id) == deployment_id,
        or_(col(Replica.status) != ReplicaStatus.TERMINATED, col(Replica.created_at) >= since),
    )


def _live() -> SelectOfScalar[Deployment]:
    return select(Deployment).where(col(Deployment.deleted_at).is_(None))
