"""The loop guard at the door: a request that already went through this instance (it carries this instance's hop id,
orchestrator.gateway.hops) is answered 508 before any route, so no upstream call is made for it."""

from __future__ import annotations

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, Scope, Send

from api.gateway.envelopes import openai_error
from api.gateway.routes import answer
from orchestrator.gateway.hops import HEADER, Hops, LoopDetected

_HEADER = HEADER.encode()


def loop_guard(app: ASGIApp, hops: Hops) -> ASGIApp:
    """Every HTTP path, not only the gateway's: a probe or a token count sent around a loop comes back elsewhere."""

    async def guard(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        values = [value for name, value in scope["headers"] if name == _HEADER]
        if not values:  # a client's call: nothing to check, nothing to pass on
            await app(scope, receive, send)
            return
        try:
            chain = hops.chain(b",".join(values))
        except LoopDetected as e:
            await answer(send, openai_error(e))
            return
        token = hops.serving(chain)
        try:
            await app(scope, receive, send)
        finally:
            hops.served(token)

    return guard
