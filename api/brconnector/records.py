"""Chat records: every session and thread for an admin (`/admin`), and a key's own for its caller (`/user`).
The connector forgot to scope `/user/thread/list` to the caller; here every `/user` route is scoped."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, get
from litestar.di import NamedDependency
from litestar.exceptions import PermissionDeniedException

from api.brconnector import schemas as s
from api.brconnector.admin import Limit, Offset, OptId, PathId, Text
from api.brconnector.envelope import caller, ok, page
from orchestrator.billing.accounts import AccountService
from orchestrator.billing.history import CallRecordService
from orchestrator.domain import money
from orchestrator.gateway.catalog import SERVER_ADMIN


class AdminRecords(Controller):
    path = "/admin"
    tags = ["connector: chat records"]

    @get("/session/list")
    async def sessions(
        self,
        call_records: NamedDependency[CallRecordService],
        *,
        q: Text = None,
        key_id: OptId = None,
        limit: Limit = 20,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        p = await call_records.sessions(key_id=key_id or None, q=q, limit=limit, offset=offset)
        return page(p, [s.session_out(x) for x in p.items])

    @get("/session/detail/{session_id:int}")
    async def session(self, call_records: NamedDependency[CallRecordService], session_id: PathId) -> dict[str, Any]:
        return ok(s.session_out(await call_records.session(session_id)))

    @get("/thread/list")
    async def threads(
        self,
        call_records: NamedDependency[CallRecordService],
        *,
        q: Text = None,
        key_id: OptId = None,
        session_id: OptId = None,
        limit: Limit = 20,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        p = await call_records.threads(
            key_id=key_id or None, session_id=session_id or None, q=q, limit=limit, offset=offset
        )
        return page(p, [s.thread_out(x, detail=False) for x in p.items])

    @get("/thread/detail/{thread_id:int}")
    async def thread(self, call_records: NamedDependency[CallRecordService], thread_id: PathId) -> dict[str, Any]:
        return ok(s.thread_out(await call_records.thread(thread_id), detail=True))


class UserRecords(Controller):
    path = "/user"
    tags = ["connector: chat records"]

    @get("/api-key/mine")
    async def mine(self, request: Request[Any, Any, Any], accounts: NamedDependency[AccountService]) -> dict[str, Any]:
        me = caller(request)
        if me is SERVER_ADMIN:
            return ok({"id": 0, "name": "admin", "role": "admin", "kind": SERVER_ADMIN.kind})
        key = await accounts.key(me.id)
        mine = s.key_out(key)
        account = accounts.account_now(me.id)  # with the fees not yet written
        if account is not None:
            mine.update({"balance": money.usd(account.balance), "month_fee": money.usd(account.month_fee)})
        return ok(mine)

    @get("/session/list")
    async def sessions(
        self,
        request: Request[Any, Any, Any],
        call_records: NamedDependency[CallRecordService],
        *,
        q: Text = None,
        limit: Limit = 20,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        p = await call_records.sessions(key_id=caller(request).id, q=q, limit=limit, offset=offset)
        return page(p, [s.session_out(x) for x in p.items])

    @get("/session/detail/{session_id:int}")
    async def session(
        self, request: Request[Any, Any, Any], call_records: NamedDependency[CallRecordService], session_id: PathId
    ) -> dict[str, Any]:
        found = await call_records.session(session_id)
        _own(request, found.key_id, "session")
        return ok(s.session_out(found))

    @get("/thread/list")
    async def threads(
        self,
        request: Request[Any, Any, Any],
        call_records: NamedDependency[CallRecordService],
        *,
        q: Text = None,
        session_id: OptId = None,
        limit: Limit = 20,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        p = await call_records.threads(
            key_id=caller(request).id, session_id=session_id or None, q=q, limit=limit, offset=offset
        )
        return page(p, [s.thread_out(x, detail=False) for x in p.items])

    @get("/thread/detail/{thread_id:int}")
    async def thread(
        self, request: Request[Any, Any, Any], call_records: NamedDependency[CallRecordService], thread_id: PathId
    ) -> dict[str, Any]:
        found = await call_records.thread(thread_id)
        _own(request, found.api_key_id, "thread")
        return ok(s.thread_out(found, detail=True))


def _own(request: Request[Any, Any, Any], owner_id: int | None, what: str) -> None:
    if owner_id != caller(request).id:
        raise PermissionDeniedException(f"Unauthorized: not your {what}.")
