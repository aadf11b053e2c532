"""SQL of the connector's accounts: keys with their quota and balance, payments, groups, the bindings of
models to keys and groups, and the totals. One method is one transaction."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import delete, func, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from orchestrator.domain.errors import Conflict, NotFound
from orchestrator.store.listing import Page, found, paged
from orchestrator.store.tables import (
    ApiKey,
    ChatSession,
    GroupModel,
    KeyGroup,
    KeyModel,
    LlmModel,
    Metric,
    Payment,
    row_id,
    utcnow,
)

KEY_NOT_FOUND = "api_key or id is invalid"
Toggle = Literal["created", "deleted"]


@dataclass(frozen=True)
class Binding:
    id: int
    owner_id: int
    owner_name: str
    model_id: int
    model_name: str
    created_at: datetime


@dataclass(frozen=True)
class Totals:
    count_key: int
    active_key: int
    active_key_this_month: int
    total_fee: int
    total_month_fee: int


class AccountStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    # -- keys -------------------------------------------------------------------------------

    async def add_key(self, key: ApiKey) -> ApiKey:
        async with self._sessions() as s:
            if key.group_id is not None:
                await _group(s, key.group_id)
            s.add(key)
            await s.commit()
        return key

    async def key(self, key_id: int) -> ApiKey:
        async with self._sessions() as s:
            return await _key(s, key_id)

    async def key_id_by_hash(self, key_hash: str) -> int:
        async with self._sessions() as s:
            found = (await s.exec(select(col(ApiKey.id)).where(col(ApiKey.key_hash) == key_hash))).first()
        if found is None:
            raise NotFound(KEY_NOT_FOUND)
        return row_id(found)

    async def update_key(self, key_id: int, changes: dict[str, Any]) -> ApiKey:
        async with self._sessions() as s:
            key = await _key(s, key_id)
            if changes.get("group_id") is not None:
                await _group(s, changes["group_id"])
            for name, value in changes.items():
                setattr(key, name, value)
            key.updated_at = utcnow()
            s.add(key)
            await s.commit()
            return key

    async def recharge(self, key_id: int, amount: int) -> ApiKey:
        """A payment row and balance += amount, relative to the row as it is (charges may land meanwhile)."""
        async with self._sessions() as s:
            await _key(s, key_id)
            s.add(Payment(key_id=key_id, fee=amount))
            await s.exec(
                update(ApiKey)
                .where(col(ApiKey.id) == key_id)
                .values(balance=col(ApiKey.balance) + amount, updated_at=utcnow())
            )
            await s.commit()
            return await _key(s, key_id)

    async def delete_key(self, key_id: int) -> None:
        """The key and everything it owns: bindings, chat records and payments."""
        async with self._sessions() as s:
            await _key(s, key_id, lock=True)  # a batch of its calls being written finishes first
            await s.exec(delete(Metric).where(col(Metric.api_key_id) == key_id))
            await s.exec(delete(ChatSession).where(col(ChatSession.key_id) == key_id))
            await s.exec(delete(KeyModel).where(col(KeyModel.key_id) == key_id))
            await s.exec(delete(Payment).where(col(Payment.key_id) == key_id))
            await s.exec(delete(ApiKey).where(col(ApiKey.id) == key_id))
            await s.commit()

    async def keys(
        self, *, q: str | None, name: str | None, group_id: int | None, role: str | None, limit: int, offset: int
    ) -> Page[tuple[ApiKey, str | None]]:
        query = (
            select(ApiKey, col(KeyGroup.name))
            .outerjoin(KeyGroup, col(KeyGroup.id) == col(ApiKey.group_id))
            .order_by(col(ApiKey.updated_at).desc(), col(ApiKey.id).desc())
        )
        if q:
            query = query.where(found(q, col(ApiKey.name), col(ApiKey.email)))
        if name:
            query = query.where(col(ApiKey.name) == name)
        if group_id is not None:  # 0: in no group, as the connector shows it
            query = query.where(col(ApiKey.group_id) == group_id if group_id else col(ApiKey.group_id).is_(None))
        if role:
            query = query.where(col(ApiKey.role) == role)
        async with self._sessions() as s:
            return await paged(s, query, limit, offset)

    async def payments(self, *, key_id: int | None, limit: int, offset: int) -> Page[Payment]:
        query = select(Payment).order_by(col(Payment.id).desc())
        if key_id is not None:
            query = query.where(col(Payment.key_id) == key_id)
        async with self._sessions() as s:
            return await paged(s, query, limit, offset)

    async def totals(self, month: int, month_start: datetime) -> Totals:
        spent = col(ApiKey.total_fee) > 0
        this_month = col(ApiKey.fee_month) == month
        async with self._sessions() as s:
            row = (
                await s.exec(
                    select(  # type: ignore[call-overload]
                        func.count(col(ApiKey.id)),
                        func.count(col(ApiKey.id)).filter(spent),
                        func.count(col(ApiKey.id)).filter(spent, col(ApiKey.updated_at) >= month_start),
                        func.coalesce(func.sum(col(ApiKey.total_fee)), 0),
                        func.coalesce(func.sum(col(ApiKey.month_fee)).filter(this_month), 0),
                    ).where(col(ApiKey.enabled))
                )
            ).one()
        return Totals(*(int(v) for v in row))

    # -- groups -----------------------------------------------------------------------------

    async def groups(self, *, q: str | None, limit: int, offset: int) -> Page[KeyGroup]:
        query = select(KeyGroup).order_by(col(KeyGroup.id))
        if q:
            query = query.where(found(q, col(KeyGroup.name)))
        async with self._sessions() as s:
            return await paged(s, query, limit, offset)

    async def group(self, group_id: int) -> KeyGroup:
        async with self._sessions() as s:
            return await _group(s, group_id)

    async def save_group(self, group_id: int | None, name: str | None, key: str | None) -> KeyGroup:
        async with self._sessions() as s:
            if group_id is None:
                group = KeyGroup(name=name or "", key=key)
            else:
                group = await _group(s, group_id)
                if name:
                    group.name = name
                group.key = key
                group.updated_at = utcnow()
            s.add(group)
            try:
                await s.commit()
            except IntegrityError as e:
                raise Conflict(f"{name} already exists") from e
            return group

    async def delete_group(self, group_id: int) -> None:
        """The group and its bindings; its keys stay, in no group."""
        async with self._sessions() as s:
            await _group(s, group_id)
            await s.exec(delete(GroupModel).where(col(GroupModel.group_id) == group_id))
            await s.exec(update(ApiKey).where(col(ApiKey.group_id) == group_id).values(group_id=None))
            await s.exec(delete(KeyGroup).where(col(KeyGroup.id) == group_id))
            await s.commit()

    # -- model bindings ---------------------------------------------------------------------

    async def toggle_key_model(self, key_id: int, model_id: int) -> Toggle:
        async with self._sessions() as s:
            await _key(s, key_id)
            return await _toggle(s, KeyModel, "key_id", key_id, model_id)

    async def toggle_group_model(self, group_id: int, model_id: int) -> Toggle:
        async with self._sessions() as s:
            await _group(s, group_id)
            return await _toggle(s, GroupModel, "group_id", group_id, model_id)

    async def key_models(self, *, key_id: int | None, q: str | None, limit: int, offset: int) -> Page[Binding]:
        return await self._bindings(KeyModel, ApiKey, key_id, q, limit, offset)

    async def group_models(self, *, group_id: int | None, q: str | None, limit: int, offset: int) -> Page[Binding]:
        return await self._bindings(GroupModel, KeyGroup, group_id, q, limit, offset)

    async def _bindings(  # noqa: PLR0917  (the two kinds of binding share one listing)
        self,
        binding: type[KeyModel] | type[GroupModel],
        owner: type[ApiKey] | type[KeyGroup],
        owner_id: int | None,
        q: str | None,
        limit: int,
        offset: int,
    ) -> Page[Binding]:
        """Live models bound to keys or to groups, with the owner's and the model's names."""
        owner_fk = col(KeyModel.key_id) if binding is KeyModel else col(GroupModel.group_id)
        query = (
            select(binding, owner_fk, col(owner.name), col(LlmModel.name))
            .join(owner, col(owner.id) == owner_fk)
            .join(LlmModel, col(LlmModel.id) == col(binding.model_id))
            .where(col(LlmModel.deleted_at).is_(None))
            .order_by(col(binding.id))
        )
        if owner_id is not None:
            query = query.where(owner_fk == owner_id)
        if q:
            query = query.where(found(q, col(owner.name), col(LlmModel.name)))
        async with self._sessions() as s:
            page = await paged(s, query, limit, offset)
        items = [
            Binding(row_id(b.id), owner_of, owner_name or "", b.model_id, model_name, b.created_at)
            for b, owner_of, owner_name, model_name in page.items
        ]
        return Page(items, page.total, page.limit, page.offset)


async def _key(s: AsyncSession, key_id: int, *, lock: bool = False) -> ApiKey:
    key = await s.get(ApiKey, key_id, with_for_update=lock)
    if key is None:
        raise NotFound(KEY_NOT_FOUND)
    return key


async def _group(s: AsyncSession, group_id: int) -> KeyGroup:
    group = await s.get(KeyGroup, group_id)
    if group is None:
        raise NotFound(f"group {group_id} is not found")
    return group


async def _toggle(
    s: AsyncSession, table: type[KeyModel] | type[GroupModel], owner: str, owner_id: int, model_id: int
) -> Toggle:
    """Bind the model if it is not bound, unbind it if it is (the connector's toggle)."""
    model = await s.get(LlmModel, model_id)
    if model is None or model.deleted_at is not None:
        raise NotFound(f"model {model_id} is not found")
    where = (getattr(table, owner) == owner_id, col(table.model_id) == model_id)
    found = (await s.exec(select(table).where(*where))).first()
    if found is not None:
        await s.delete(found)
        outcome: Toggle = "deleted"
    else:
        s.add(
            KeyModel(key_id=owner_id, model_id=model_id)
            if table is KeyModel
            else GroupModel(group_id=owner_id, model_id=model_id)
        )
        outcome = "created"
    try:
        await s.commit()
    except IntegrityError as e:  # a concurrent toggle bound it first
        raise Conflict("the binding changed meanwhile; try again") from e
    return outcome
