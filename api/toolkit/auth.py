"""Admin authentication of the toolkit API: `Authorization: Bearer <ADMIN_API_KEY>`."""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from litestar.handlers.base import BaseRouteHandler

from api.deps import server_keys
from orchestrator.platform.secrets import same_secret


def bearer_token(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    scheme, _, token = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def admin_only(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    token = bearer_token(connection)
    if token is None or not same_secret(token, server_keys(connection).admin_api_key):
        raise NotAuthorizedException("Invalid Admin API key.")
