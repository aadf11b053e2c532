"""The connector's envelope and auth: `{"success": true, "data": ...}`, `{"success": false, "data": "<message>"}`,
and the caller of `/admin` (an admin) and `/user` (any valid key) taken from `Authorization: Bearer`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import structlog
from litestar import Request, Response
from litestar.connection import ASGIConnection
from litestar.exceptions import (
    HTTPException,
    NotAuthorizedException,
    PermissionDeniedException,
    ValidationException,
)
from litestar.handlers.base import BaseRouteHandler
from litestar.status_codes import (
    HTTP_400_BAD_REQUEST,
    HTTP_404_NOT_FOUND,
    HTTP_409_CONFLICT,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
)

from api.deps import gateway_of
from api.gateway.routes import client_address, credentials
from orchestrator.domain.errors import Conflict, DomainError, InvalidInput, NotFound, Unavailable
from orchestrator.gateway.catalog import KeyInfo
from orchestrator.gateway.flow import IpRefused, Unauthorized
from orchestrator.store.listing import Page

log = structlog.get_logger(__name__)

NO_KEY = "Unauthorized: api key required"
BAD_KEY = "Unauthorized: api key error"
NOT_ADMIN = "Unauthorized: you are not an admin role."


def ok(data: Any) -> dict[str, Any]:
    return {"success": True, "data": data}


def page(p: Page[Any], items: Sequence[Any]) -> dict[str, Any]:
    return ok({"items": list(items), "total": p.total, "limit": p.limit, "offset": p.offset})


def failure(message: str, status: int) -> Response[Any]:
    return Response({"success": False, "data": message}, status_code=status, media_type="application/json")


def caller(connection: ASGIConnection[Any, Any, Any, Any]) -> KeyInfo:
    """The key calling, as the gateway knows it (or the server's admin key); set by the guards."""
    key: KeyInfo = connection.scope["state"]["caller"]
    return key


def _authenticate(connection: ASGIConnection[Any, Any, Any, Any]) -> KeyInfo:
    """The key as the gateway authenticates it (the same headers, the server's admin key included)."""
    token, _ = credentials(connection.scope)  # type: ignore[arg-type]
    if not token:
        raise NotAuthorizedException(NO_KEY)
    try:
        key = gateway_of(connection).authenticate(token, client_address(connection.scope))  # type: ignore[arg-type]
    except IpRefused as e:
        raise NotAuthorizedException(str(e)) from e
    except Unauthorized as e:
        raise NotAuthorizedException(BAD_KEY) from e
    connection.scope.setdefault("state", {})["caller"] = key
    return key


def any_key(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    _authenticate(connection)


def admin_key(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    if not _authenticate(connection).admin:
        raise PermissionDeniedException(NOT_ADMIN)


def _field_message(err: Mapping[str, Any]) -> str:
    field = ".".join(str(p) for p in err.get("loc", ())) or "body"
    if err.get("type") == "missing":
        return f"{field} is required"
    return f"{field}: {err.get('msg', 'invalid value')}"


def on_validation(_: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    errors = getattr(exc.__cause__, "errors", None)
    errors = errors() if callable(errors) else errors
    if isinstance(errors, list) and errors:  # a body: pydantic's own error list
        return failure(_field_message(errors[0]), HTTP_400_BAD_REQUEST)
    for item in exc.extra if isinstance(exc.extra, list) else []:
        if item.get("source") == "body":
            return failure("a JSON object body is required", HTTP_400_BAD_REQUEST)
        return failure(f"{item.get('key')}: {item.get('message')}", HTTP_400_BAD_REQUEST)
    return failure(str(exc.detail), HTTP_400_BAD_REQUEST)


def on_http(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    return failure(str(exc.detail), exc.status_code)


def on_domain(_: Request[Any, Any, Any], exc: DomainError) -> Response[Any]:
    if isinstance(exc, NotFound):
        return failure(str(exc), HTTP_404_NOT_FOUND)
    if isinstance(exc, InvalidInput):
        return failure(exc.message, HTTP_400_BAD_REQUEST)
    if isinstance(exc, Conflict):
        return failure(str(exc), HTTP_409_CONFLICT)
    log.error("connector.domain_error", error=repr(exc))
    return failure("Internal server error", HTTP_500_INTERNAL_SERVER_ERROR)


def on_unavailable(_: Request[Any, Any, Any], exc: Unavailable) -> Response[Any]:
    response = failure(str(exc), HTTP_503_SERVICE_UNAVAILABLE)
    response.headers["Retry-After"] = str(exc.retry_after_s)
    return response


HANDLERS: Mapping[Any, Any] = {
    ValidationException: on_validation,
    HTTPException: on_http,
    DomainError: on_domain,
    Unavailable: on_unavailable,
}
