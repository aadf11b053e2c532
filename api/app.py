"""The Litestar application: every surface mounted on one app, with the runtime in its lifespan."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from litestar import Litestar, Request, Response, get
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.enums import ScopeType
from litestar.exceptions import ClientException, HTTPException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR, HTTP_503_SERVICE_UNAVAILABLE
from litestar.types import ASGIApp, Receive, Scope, Send

from api.brconnector.envelope import failure
from api.brconnector.routes import connector_routers
from api.deps import SERVICES, app_state
from api.gateway.routes import GatewayRoutes, match
from api.hosts.routes import hosts_router
from api.litellm.token_counter import litellm_router
from api.llmendpoint.completions import COMPLETIONS_PATH, CompletionRoute
from api.llmendpoint.tasks import qcompletions_router
from api.loop_guard import loop_guard
from api.moonshot.routes import moonshot_router
from api.openapi.assets import DocsAssets
from api.openapi.pages import SCHEMA_PATH, openapi_config
from api.request_log import request_log
from api.toolkit.routes import toolkit_router
from orchestrator.domain.errors import Unavailable
from orchestrator.fleet.replicas import ReplicaService
from orchestrator.runtime.compose import Runtime
from orchestrator.runtime.metrics import ServerMetrics
from orchestrator.store.db import root_cause, unreachable

log = structlog.get_logger(__name__)


@get("/health", tags=["ops"])
async def health() -> dict[str, str]:
    return {"status": "ok"}


@get("/metrics", tags=["ops"], media_type="text/plain; version=0.0.4", dependencies=SERVICES)
async def metrics(metrics: NamedDependency[ServerMetrics], replicas: NamedDependency[ReplicaService]) -> bytes:
    return metrics.render(await replicas.count_by_status())


# The connector's paths: a path no route matches (404) or a method none takes (405) is refused before any router's
# handlers, so here, in the connector's envelope.
_CONNECTOR_PREFIXES = ("/admin/", "/user/", "/bot/")


def _on_http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    if request.url.path.startswith(_CONNECTOR_PREFIXES):
        return failure(str(exc.detail), exc.status_code)
    return Response({"error": str(exc.detail)}, status_code=exc.status_code)


_MSGSPEC_TOO_DEEP = "while deserializing"  # msgspec's words when a document is nested past its recursion limit


def _on_undecodable(request: Request[Any, Any, Any], exc: UnicodeDecodeError | RecursionError) -> Response[Any]:
    """A JSON body with bytes that are not UTF-8 in a string, or nested deeper than msgspec recurses: msgspec raises
    UnicodeDecodeError or RecursionError there, which Litestar lets through (it turns only msgspec's DecodeError
    into its 400 "JSON is malformed"). Answered as that 400, by the route's own handler for it, so each surface
    keeps its envelope. A RecursionError from anywhere else is a bug, and stays a 500."""
    if isinstance(exc, UnicodeDecodeError):
        bad_request = ClientException(f"JSON is malformed: not UTF-8 ({exc.reason})")
    elif _MSGSPEC_TOO_DEEP in str(exc):
        bad_request = ClientException("JSON is malformed: nested too deeply")
    else:
        return _on_unexpected(request, exc)
    response: Response[Any] = _surface_handler(request, bad_request, _on_http)(request, bad_request)
    return response


def _surface_handler(request: Request[Any, Any, Any], exc: Exception, default: Any) -> Any:
    """The handler the request's route has for `exc` (by status code, then by class, as Litestar looks them up),
    so that an error found here is answered in that surface's envelope; `default` when only the catch-all
    (`Exception`) would take it."""
    route_handler = request.scope.get("route_handler")
    handlers = route_handler.resolve_exception_handlers() if route_handler is not None else {}
    status = getattr(exc, "status_code", None)
    if isinstance(status, int) and status in handlers:
        return handlers[status]
    classes = itertools.takewhile(lambda cls: cls is not Exception, type(exc).__mro__)  # the catch-all is ours
    return next((handlers[cls] for cls in classes if cls in handlers), default)


def _on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    if unreachable(exc):
        return _on_unreachable(request, exc)
    log.error("request.failed", path=request.url.path, exc_info=exc)
    return Response({"error": "Internal server error"}, status_code=HTTP_500_INTERNAL_SERVER_ERROR)


def _on_unreachable(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """The database is down or restarting (the gateway, served from memory, goes on): a 503 with Retry-After in
    the route's envelope and one warning line, not a 500 with a traceback."""
    cause = root_cause(exc)  # not SQLAlchemy's own text: it carries the statement's parameters
    log.warning("database.unreachable", path=request.url.path, error=type(cause).__name__, detail=str(cause)[:200])
    unavailable = Unavailable("The database cannot be reached right now; try again shortly.")
    response: Response[Any] = _surface_handler(request, unavailable, _on_unavailable)(request, unavailable)
    return response


def _on_unavailable(_: Request[Any, Any, Any], exc: Unavailable) -> Response[Any]:
    """Routes whose surface has no envelope of its own for it (`/metrics`)."""
    headers = {"Retry-After": str(exc.retry_after_s)}
    return Response({"error": str(exc)}, status_code=HTTP_503_SERVICE_UNAVAILABLE, headers=headers)


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

    admin = create_admin_app(runtime)
    return request_log(loop_guard(front, runtime.deps.upstream.hops))


def create_admin_app(runtime: Runtime) -> Litestar:
    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    assets = DocsAssets.installed(f"{SCHEMA_PATH}/static")
    return Litestar(
        route_handlers=[
            health,
            metrics,
            toolkit_router(),
            hosts_router(),
            *connector_routers(),
            litellm_router(),
            moonshot_router(),
            qcompletions_router(),
            assets.router(),
        ],
        state=State(app_state(runtime.deps)),
        lifespan=[lifespan],
        exception_handlers={
            HTTPException: _on_http,
            UnicodeDecodeError: _on_undecodable,
            RecursionError: _on_undecodable,
            Exception: _on_unexpected,
        },
        request_max_body_size=runtime.deps.settings.max_body_bytes,
        openapi_config=openapi_config("GPU replica orchestrator", "0.1.0", assets),
        logging_config=None,
        debug=False,
    )
