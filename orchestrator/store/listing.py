"""Pages of rows, as the connector's lists give them (`{items, total, limit, offset}`): one page of a query with
the count of all its rows (`paged`), and `q` as a substring search in given columns (`found`). What limit a caller
may ask for is the API's to say, not the store's."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import ColumnElement, func, or_
from sqlalchemy import select as core_select
from sqlmodel.ext.asyncio.session import AsyncSession

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    items: Sequence[T]
    total: int
    limit: int
    offset: int


def found(q: str, *columns: Any) -> ColumnElement[bool]:
    """`q` anywhere in any of `columns`, ignoring case on both databases; LIKE's wildcards in `q` are literal."""
    pattern = "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    return or_(*(column.ilike(pattern, escape="\\") for column in columns))


async def paged(s: AsyncSession, query: Any, limit: int, offset: int) -> Page[Any]:
    """One page of `query` (already filtered and ordered) and the count of all its rows."""
    counted = core_select(func.count()).select_from(query.order_by(None).subquery())
    total = (await (await s.connection()).execute(counted)).scalar_one()
    items = (await s.exec(query.limit(limit).offset(offset))).all()
    return Page(items, int(total), limit, offset)
