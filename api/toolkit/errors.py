"""Errors in the toolkit's shapes: marshmallow's `{"errors": {field: [message]}}` for bad bodies,
`{"error": message}` for the rest, and never a stack trace."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import structlog
from litestar import Request, Response
from litestar.exceptions import (
    HTTPException,
    NotAuthorizedException,
    ValidationException,
)
from litestar.status_codes import (
    HTTP_400_BAD_REQUEST,
    HTTP_404_NOT_FOUND,
    HTTP_409_CONFLICT,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
)

from api.toolkit.schemas import FIELD_RULE
from orchestrator.domain.errors import Conflict, DomainError, InvalidInput, NotFound, Unavailable

log = structlog.get_logger(__name__)

SCHEMA_KEY = "_schema"  # marshmallow's key for errors that belong to no single field

_MESSAGES = {
    "missing": "Missing data for required field.",
    "extra_forbidden": "Unknown field.",
    "string_type": "Not a valid string.",
    "int_type": "Not a valid integer.",
    "int_parsing": "Not a valid integer.",
    "int_from_float": "Not a valid integer.",
    "bool_type": "Not a valid boolean.",
    "bool_parsing": "Not a valid boolean.",
    "list_type": "Not a valid list.",
    "model_type": "Invalid input type.",
    "model_attributes_type": "Invalid input type.",
    "dict_type": "Invalid input type.",
}


def _message(err: Mapping[str, Any]) -> str:
    kind = str(err.get("type", ""))
    ctx = err.get("ctx") or {}
    if err.get("input", ...) is None and kind.endswith("_type"):
        return "Field may not be null."
    if kind == "string_too_short":
        return f"Shorter than minimum length {ctx.get('min_length')}."
    if kind == "string_too_long":
        return f"Longer than maximum length {ctx.get('max_length')}."
    if kind == "literal_error":  # pydantic says "'a', 'b' or 'c'"; marshmallow says "a, b, c"
        expected = str(ctx.get("expected", "")).replace("'", "").replace(" or ", ", ")
        return f"Must be one of: {expected}."
    return _MESSAGES.get(kind, str(err.get("msg", "Invalid value.")))


def marshmallow_errors(errors: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """pydantic's flat error list -> marshmallow's nested `{field: {index: {field: [msg]}}}`."""
    out: dict[str, Any] = {}
    for err in errors:
        loc = [str(part) for part in err.get("loc", ())]
        ctx = err.get("ctx") or {}
        if err.get("type") == FIELD_RULE:
            loc.append(str(ctx.get("field", SCHEMA_KEY)))
        if not loc:
            loc = [SCHEMA_KEY]
        node = out
        for part in loc[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):  # a field with both its own and nested errors
                child = node[part] = {SCHEMA_KEY: child}
            node = child
        node.setdefault(loc[-1], []).append(_message(err))
    return out


def _json(body: Mapping[str, Any], status: int) -> Response[Any]:
    return Response(body, status_code=status, media_type="application/json")


def on_validation(_: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    errors = getattr(exc.__cause__, "errors", None)
    if isinstance(errors, list):  # a body: pydantic's own error list
        return _json({"errors": marshmallow_errors(errors)}, HTTP_400_BAD_REQUEST)
    # A path or query parameter: Litestar's list of {key, message}.
    out: dict[str, list[str]] = {}
    for item in exc.extra if isinstance(exc.extra, list) else []:
        if item.get("source") == "body":  # no body at all
            out.setdefault(SCHEMA_KEY, []).append("A JSON object body is required.")
        else:
            out.setdefault(str(item.get("key", SCHEMA_KEY)), []).append(str(item.get("message", "Invalid value.")))
    return _json({"errors": out or {SCHEMA_KEY: [str(exc.detail)]}}, HTTP_400_BAD_REQUEST)


def on_http(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    detail = str(exc.detail)
    if exc.status_code == HTTP_400_BAD_REQUEST and not isinstance(exc, NotAuthorizedException):
        # A body Litestar could not decode (malformed JSON): still the marshmallow shape.
        return _json({"errors": {SCHEMA_KEY: [detail]}}, HTTP_400_BAD_REQUEST)
    return _json({"error": detail}, exc.status_code)


def on_domain(_: Request[Any, Any, Any], exc: DomainError) -> Response[Any]:
    if isinstance(exc, NotFound):
        return _json({"error": str(exc)}, HTTP_404_NOT_FOUND)
    if isinstance(exc, InvalidInput):  # a dotted field nests as a body error on that field would
        error = {"loc": tuple(exc.field.split(".")), "type": "domain", "msg": exc.message}
        return _json({"errors": marshmallow_errors([error])}, HTTP_400_BAD_REQUEST)
    if isinstance(exc, Conflict):
        return _json({"error": str(exc)}, HTTP_409_CONFLICT)
    # InvalidTransition is a bug, never the caller's fault.
    log.error("toolkit.domain_error", error=repr(exc))
    return _json({"error": "Internal server error"}, HTTP_500_INTERNAL_SERVER_ERROR)


def on_unavailable(_: Request[Any, Any, Any], exc: Unavailable) -> Response[Any]:
    headers = {"Retry-After": str(exc.retry_after_s)}
    return Response({"error": str(exc)}, status_code=HTTP_503_SERVICE_UNAVAILABLE, headers=headers)


HANDLERS: Mapping[Any, Any] = {
    ValidationException: on_validation,
    HTTPException: on_http,
    DomainError: on_domain,
    Unavailable: on_unavailable,
}
