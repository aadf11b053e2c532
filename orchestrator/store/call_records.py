"""SQL of the call records: a batch of calls written with their sessions, their keys' charges and the marks of the
journal segments they came from in one transaction, and the sessions and threads read back, for an admin or for the
key that made them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, case, delete, func, literal, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from orchestrator.domain.errors import NotFound
from orchestrator.domain.spend import CONNECTOR, Account
from orchestrator.store.listing import Page, found, paged
from orchestrator.store.tables import ApiKey, ChatSession, JournalSegment, Metric, row_id, table_of, utcnow

INSERT_SLICE = 200
"""Call rows per INSERT statement of a batch."""


@dataclass(slots=True)
class CallRow:
    values: dict[str, Any]
    """The `metric` row, less its session id."""
    session_key: str | None = None

    @property
    def api_key_id(self) -> int | None:
        key_id: int | None = self.values["api_key_id"]
        return key_id


@dataclass(slots=True)
class SessionSum:
    key_id: int
    key: str
    in_tokens: int = 0
    out_tokens: int = 0
    fee: int = 0
    title: str | None = None


@dataclass(slots=True, frozen=True)
class Charge:
    key_id: int
    month: int
    fee: int
    on_balance: bool = False
    """Credits: off the balance alone, whatever the key's quota."""


class BatchConflict(Exception):
    """The database refused a batch of calls for a uniqueness rule (a journal segment marked written already)."""


class RecordStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def write_calls(
        self,
        rows: list[CallRow],
        sessions: list[SessionSum],
        charges: list[Charge],
        *,
        segments: Sequence[str] = (),
        forget: Sequence[str] = (),
    ) -> dict[int, Account]:
        """Insert the calls, add them to their sessions, charge their keys, and mark the journal `segments` they came
        from as written (and drop the marks of segments deleted since: `forget`), all at once; returns the charged
        accounts.

        Calls of a key deleted meanwhile are dropped with it (its records are deleted with it anyway; its id is
        never given to another key). A batch the database refuses as a whole (a segment marked written already)
        raises `BatchConflict`.
        """
        try:
            return await self._write_calls(rows, sessions, charges, segments=segments, forget=forget)
        except IntegrityError as e:
            raise BatchConflict(str(e.orig)) from e

    async def _write_calls(
        self,
        rows: list[CallRow],
        sessions: list[SessionSum],
        charges: list[Charge],
        *,
        segments: Sequence[str],
        forget: Sequence[str],
    ) -> dict[int, Account]:
        async with self._sessions() as s:
            conn = await s.connection()
            dialect = conn.dialect.name
            live = await _live_keys(s, {r.api_key_id for r in rows if r.api_key_id is not None}, dialect)
            now = utcnow()
            session_ids: dict[tuple[int | None, str | None], int] = {
                (t.key_id, t.key): await _add_to_session(conn, t, now, dialect) for t in sessions if t.key_id in live
            }
            values = []
            for row in rows:
                key_id = row.api_key_id
                if key_id is None or key_id in live:
                    row.values["session_id"] = session_ids.get((key_id, row.session_key))
                    values.append(row.values)
            table = table_of(Metric)
            # In slices: the statement's parameters are processed on the event loop, and a second's calls in one
            # go would hold it for tens of milliseconds (the gateway's p99); each slice awaits the driver.
            for start in range(0, len(values), INSERT_SLICE):
                await conn.execute(table.insert(), values[start : start + INSERT_SLICE])
            fresh = {c.key_id: await _charge(conn, c) for c in charges if c.key_id in live}
            marks = table_of(JournalSegment)
            if forget:
                await conn.execute(delete(marks).where(marks.c.name.in_(list(forget))))
            if segments:
                await conn.execute(marks.insert(), [{"name": name, "written_at": now} for name in segments])
            await s.commit()
        return fresh

    async def written(self, segment: str) -> bool:
        """Whether a journal segment's calls are in the database already."""
        async with self._sessions() as s:
            return await s.get(JournalSegment, segment) is not None

    async def sessions(self, *, key_id: int | None, q: str | None, limit: int, offset: int) -> Page[ChatSession]:
        query = select(ChatSession).order_by(col(ChatSession.id).desc())
        if key_id is not None:
            query = query.where(col(ChatSession.key_id) == key_id)
        if q:
            query = query.where(found(q, col(ChatSession.title)))
        async with self._sessions() as s:
            return await paged(s, query, limit, offset)

    async def session(self, session_id: int) -> ChatSession:
        async with self._sessions() as s:
            found = await s.get(ChatSession, session_id)
        if found is None:
            raise NotFound(f"session {session_id} is not found")
        return found

    async def threads(
        self, *, key_id: int | None, session_id: int | None, q: str | None, limit: int, offset: int
    ) -> Page[Metric]:
        """Calls made with a client key (the server's admin key makes usage rows, not threads); newest first,
        or in the order they happened within one session."""
        query = select(Metric).where(col(Metric.api_key_id).is_not(None))
        if key_id is not None:
            query = query.where(col(Metric.api_key_id) == key_id)
        if session_id is not None:
            query = query.where(col(Metric.session_id) == session_id).order_by(col(Metric.id))
        else:
            query = query.order_by(col(Metric.id).desc())
        if q:
            query = query.where(found(q, col(Metric.prompt), col(Metric.choices)))
        async with self._sessions() as s:
            return await paged(s, query, limit, offset)

    async def thread(self, thread_id: int) -> Metric:
        async with self._sessions() as s:
            row = await s.get(Metric, thread_id)
        if row is None or row.api_key_id is None:  # the server admin key's calls are usage rows, not threads
            raise NotFound(f"thread {thread_id} is not found")
        return row


async def _live_keys(s: AsyncSession, key_ids: set[int], dialect: str) -> set[int]:
    if not key_ids:
        return set()
    query = select(col(ApiKey.id)).where(col(ApiKey.id).in_(key_ids)).order_by(col(ApiKey.id))
    if dialect == "postgresql":
        # Lock the keys (in id order) before charging them: another instance's flush waits instead of
        # deadlocking on a lock upgrade, and a key deleted now waits for this batch, then takes it along.
        query = query.with_for_update(key_share=True)
    return {row_id(i) for i in (await s.exec(query)).all()}


async def _add_to_session(conn: AsyncConnection, t: SessionSum, now: Any, dialect: str) -> int:
    table = table_of(ChatSession)
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(table).values(
        key_id=t.key_id,
        key=t.key,
        title=t.title,
        total_in_tokens=t.in_tokens,
        total_out_tokens=t.out_tokens,
        total_fee=t.fee,
        created_at=now,
        updated_at=now,
    )
    new = stmt.excluded
    upsert = stmt.on_conflict_do_update(
        index_elements=["key_id", "key"],
        set_={
            "title": func.coalesce(new.title, table.c.title),
            "total_in_tokens": table.c.total_in_tokens + new.total_in_tokens,
            "total_out_tokens": table.c.total_out_tokens + new.total_out_tokens,
            "total_fee": table.c.total_fee + new.total_fee,
            "updated_at": new.updated_at,
        },
    ).returning(table.c.id)
    return int((await conn.execute(upsert)).scalar_one())


async def _charge(conn: AsyncConnection, c: Charge) -> Account:
    """One atomic UPDATE, relative to the row as it is (a recharge or another instance's charge may have
    landed since this instance last read it): quota first, then balance. Mirrors `Account.charged`."""
    fee = literal(c.fee, BigInteger)
    month_fee = case((col(ApiKey.fee_month) == c.month, col(ApiKey.month_fee)), else_=0)
    room = case((col(ApiKey.month_quota) > month_fee, col(ApiKey.month_quota) - month_fee), else_=0)
    from_quota = case((col(ApiKey.kind) != CONNECTOR, fee), (room > fee, fee), else_=room)
    values: dict[str, Any] = {"total_fee": col(ApiKey.total_fee) + fee, "updated_at": utcnow()}
    if c.on_balance:
        values["balance"] = col(ApiKey.balance) - fee
    else:
        values.update(
            month_fee=month_fee + from_quota, balance=col(ApiKey.balance) - (fee - from_quota), fee_month=c.month
        )
    stmt = (
        update(ApiKey)
        .where(col(ApiKey.id) == c.key_id)
        .values(**values)
        .returning(
            col(ApiKey.month_quota), col(ApiKey.balance), col(ApiKey.month_fee), col(ApiKey.fee_month), col(ApiKey.kind)
        )
    )
    quota, balance, month_fee_now, fee_month, kind = (await conn.execute(stmt)).one()
    return Account(quota, balance, month_fee_now, fee_month, metered=kind == CONNECTOR)
