"""Moonshot's connector routes: parse -> call the service -> shape the answer. Bad bodies answer 422
`{"error": [message, ...]}`, each message naming its field; JSON that does not parse answers 400 in that shape."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from litestar import Controller, Request, Response, Router, delete, get, post
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody
from litestar.status_codes import (
    HTTP_200_OK,
    HTTP_400_BAD_REQUEST,
    HTTP_404_NOT_FOUND,
    HTTP_422_UNPROCESSABLE_ENTITY,
    HTTP_503_SERVICE_UNAVAILABLE,
)

from api.deps import SERVICES
from api.moonshot import schemas as s
from api.toolkit.auth import admin_only
from orchestrator.domain.errors import InvalidInput, NotFound, Unavailable
from orchestrator.surfaces.moonshot.endpoints import CONNECTOR_TYPES, EndpointView, ExternalEndpointService

NOT_AN_OBJECT = "body must be a JSON object"


class LlmEndpointController(Controller):
    tags = ["moonshot"]

    @get("/connectors")
    async def connectors(self) -> list[str]:
        return list(CONNECTOR_TYPES)

    @get("/llm_endpoints")
    async def endpoints(self, endpoints: NamedDependency[ExternalEndpointService]) -> list[EndpointView]:
        return await endpoints.endpoints()  # tokens already masked

    @post(
        "/llm_endpoints",
        status_code=HTTP_200_OK,
        responses={HTTP_422_UNPROCESSABLE_ENTITY: ResponseSpec(s.ErrorsOut, description="A bad body")},
    )
    async def add(
        self, endpoints: NamedDependency[ExternalEndpointService], data: JSONBody[s.EndpointIn]
    ) -> s.MessageOut:
        await endpoints.save(data.spec())
        return s.MessageOut(message="Endpoint added successfully")

    @delete(
        "/llm_endpoints/{endpoint_id:str}",
        status_code=HTTP_200_OK,
        responses={HTTP_404_NOT_FOUND: ResponseSpec(s.DetailOut, description="No such endpoint")},
    )
    async def remove(
        self, endpoints: NamedDependency[ExternalEndpointService], endpoint_id: FromPath[str]
    ) -> Response[Any]:
        try:
            await endpoints.delete(endpoint_id)
        except NotFound as e:
            return Response(s.DetailOut(detail=f"Failed to delete endpoint: {e}"), status_code=HTTP_404_NOT_FOUND)
        return Response(s.MessageOut(message="Endpoint deleted successfully"))


def _errors(messages: Sequence[str], status: int) -> Response[Any]:
    return Response({"error": list(messages)}, status_code=status, media_type="application/json")


def _message(err: Mapping[str, Any]) -> str:
    field = ".".join(str(part) for part in err.get("loc", ()))
    if not field:  # the body itself: a list, a string, null
        return NOT_AN_OBJECT
    if err.get("type") == "missing":
        return f"{field} is required"
    return f"{field}: {err.get('msg', 'invalid value')}"


def on_bad_request(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    """Every 400 of this router: a body that does not validate (422), or that is not JSON at all (400)."""
    if not isinstance(exc, ValidationException):
        return _errors([f"body: {exc.detail}"], HTTP_400_BAD_REQUEST)
    errors = getattr(exc.__cause__, "errors", None)
    errors = errors() if callable(errors) else errors
    if isinstance(errors, list) and errors:  # pydantic's own list
        return _errors([_message(e) for e in errors], HTTP_422_UNPROCESSABLE_ENTITY)
    # No body at all, or a path parameter: Litestar's list of {key, message, source}.
    items = exc.extra if isinstance(exc.extra, list) else []
    messages = [
        NOT_AN_OBJECT if item.get("source") == "body" else f"{item.get('key')}: {item.get('message')}" for item in items
    ]
    return _errors(messages or [str(exc.detail)], HTTP_422_UNPROCESSABLE_ENTITY)


def on_undecodable(_: Request[Any, Any, Any], __: UnicodeDecodeError) -> Response[Any]:
    # Litestar lets bytes that are not UTF-8 escape its JSON decoding as this, not as a 400.
    return _errors(["body: not UTF-8 JSON"], HTTP_400_BAD_REQUEST)


def on_invalid(_: Request[Any, Any, Any], exc: InvalidInput) -> Response[Any]:
    return _errors([exc.message], HTTP_422_UNPROCESSABLE_ENTITY)


def on_unavailable(_: Request[Any, Any, Any], exc: Unavailable) -> Response[Any]:
    response = _errors([str(exc)], HTTP_503_SERVICE_UNAVAILABLE)
    response.headers["Retry-After"] = str(exc.retry_after_s)
    return response


def moonshot_router() -> Router:
    """Admin only; a 401 answers in the app's own shape."""
    return Router(
        path="/v1",
        route_handlers=[LlmEndpointController],
        guards=[admin_only],
        dependencies=SERVICES,
        # A status code is looked up before a class: 400 takes ValidationException and malformed JSON alike.
        exception_handlers={
            HTTP_400_BAD_REQUEST: on_bad_request,
            UnicodeDecodeError: on_undecodable,
            InvalidInput: on_invalid,
            Unavailable: on_unavailable,
        },
    )
