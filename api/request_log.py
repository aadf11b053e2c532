"""One log event per HTTP request, under a request id that every log line of the request carries."""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from typing import Any

import structlog
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.platform.logs import info_direct

log = structlog.get_logger("api.request")
_stdlib = logging.getLogger("api.request")
_CLIENT_ID = re.compile(rb"^[A-Za-z0-9._-]{1,64}$")
# A random per-process prefix and a counter: unique across instances and restarts, cheaper than uuid4.
_PREFIX = os.urandom(8).hex()
_COUNTER = itertools.count(1)


def request_log(app: ASGIApp) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        request_id = _request_id(scope)
        id_header = (b"x-request-id", request_id.encode())
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        # bind/reset rather than the bound_contextvars() context manager: this runs on every gateway call.
        tokens = structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            await app(scope, receive, send_with_id)
        finally:
            structlog.contextvars.reset_contextvars(**tokens)
            if _stdlib.isEnabledFor(logging.INFO):
                # The path only: a query string may carry a key.
                fields = {
                    "request_id": request_id,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                }
                if not info_direct("api.request", "request", fields):
                    log.info("request", **fields)

    return middleware


def _request_id(scope: Scope) -> str:
    headers: Any = scope.get("headers", [])
    for name, value in headers:
        if name == b"x-request-id" and _CLIENT_ID.match(value):
            return str(value.decode())
    return f"{_PREFIX}{next(_COUNTER):016x}"
