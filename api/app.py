"""The Litestar application: every surface mounted on one app, with the runtime in its lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import httpx
import structlog
from litestar import Litestar, Request, Response, get
from litestar.datastructures import State
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from litestar.types import ASGIApp, Receive, Scope, Send

from api.brconnector.bots import FeishuReceiver
from api.brconnector.routes import connector_routers
from api.gateway.routes import GatewayRoutes, match
from api.litellm.token_counter import litellm_router
from api.llmendpoint.completions import COMPLETIONS_PATH, CompletionRoute
from api.moonshot.routes import moonshot_router
from api.request_log import request_log
from api.toolkit.routes import toolkit_router
from orchestrator.bootstrap import Runtime
from orchestrator.deps import Deps

log = structlog.get_logger(__name__)


@get("/health", tags=["ops"])
async def health() -> dict[str, str]:
    return {"status": "ok"}


@get("/metrics", tags=["ops"], media_type="text/plain; version=0.0.4")
async def metrics(state: State) -> bytes:
    deps: Deps = state.deps
    return deps.metrics.render(await deps.store.count_replicas_by_status())


def _on_http(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    return Response({"error": str(exc.detail)}, status_code=exc.status_code)


def _on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.error("request.failed", path=request.url.path, exc_info=exc)
    return Response({"error": "Internal server error"}, status_code=HTTP_500_INTERNAL_SERVER_ERROR)


def create_app(runtime: Runtime) -> ASGIApp:
    """The gateway's paths go straight to their raw ASGI handlers; everything else to the Litestar app."""
    gateway = GatewayRoutes(runtime.deps.gateway, runtime.deps.metrics, runtime.deps.queues)
    llm_completions = CompletionRoute(runtime.deps.gateway, runtime.deps.metrics)

    async def front(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == ScopeType.HTTP:
            route = match(scope["path"])
            if route is not None:
                await gateway(scope, receive, send, route)
                return
            if scope["path"] == COMPLETIONS_PATH:
                await llm_completions(scope, receive, send)
                return
        await admin(scope, receive, send)

    # Bots chat through this same app, in process, exactly as a client would (auth, billing, records).
    self_client = httpx.AsyncClient(transport=httpx.ASGITransport(app=cast(Any, front)), base_url="http://gateway")
    receiver = FeishuReceiver(runtime.deps, self_client)
    admin = create_admin_app(runtime, receiver)
    return request_log(front)


def create_admin_app(runtime: Runtime, receiver: FeishuReceiver) -> Litestar:
    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await receiver.close()
            await runtime.stop()

    return Litestar(
        route_handlers=[health, metrics, toolkit_router(), *connector_routers(), litellm_router(), moonshot_router()],
        state=State({"deps": runtime.deps, "feishu_receiver": receiver}),
        lifespan=[lifespan],
        exception_handlers={HTTPException: _on_http, Exception: _on_unexpected},
        request_max_body_size=runtime.deps.settings.max_body_bytes,
        openapi_config=OpenAPIConfig(title="GPU replica orchestrator", version="0.1.0", path="/schema"),
        logging_config=None,
        debug=False,
    )
