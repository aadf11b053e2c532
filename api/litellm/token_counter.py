"""LiteLLM's `POST /utils/token_counter`: parse -> count (orchestrator.gateway.tokens) -> answer, errors in
OpenAI's envelope, with the gateway's client keys."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, Response, Router, post
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException, ValidationException
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi import ResponseSpec
from litestar.params import JSONBody
from litestar.status_codes import HTTP_200_OK
from litestar.types import HTTPScope

from api.deps import SERVICES, gateway_of
from api.gateway.bodies import BadBody
from api.gateway.envelopes import openai_error
from api.gateway.routes import client_address, credentials
from orchestrator.gateway.catalog import KeyInfo
from orchestrator.gateway.flow import GatewayError
from orchestrator.gateway.tokens import Message, Messages, Prompt
from orchestrator.surfaces.litellm.token_counter import TokenCounter

MAX_BODY = 1024 * 1024  # bounds the work of one count too: a MiB of text encodes in well under a second
MAX_MESSAGES = 10_000
MAX_PROMPTS = 256  # a list prompt is asked of a replica one string at a time

_Short = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]


class ContentPart(msgspec.Struct):
    type: Annotated[str, msgspec.Meta(max_length=64)]
    """`text` (its text is counted) or `image_url` (a fixed amount); other kinds are refused."""
    text: str | None = None


class ChatMessage(msgspec.Struct):
    role: Annotated[str, msgspec.Meta(max_length=64)]
    content: str | list[ContentPart] | None
    name: str | None = None


class TokenCounterIn(msgspec.Struct):
    model: _Short
    prompt: str | Annotated[list[str], msgspec.Meta(min_length=1, max_length=MAX_PROMPTS)] | None = None
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1, max_length=MAX_MESSAGES)] | None = None


class TokenCounterOut(msgspec.Struct):
    total_tokens: int
    request_model: str
    model_used: str
    tokenizer_type: str
    """`vllm` (counted by one of the model's replicas) or `openai_tokenizer` (OpenAI's rule on cl100k_base)."""


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str
    """The HTTP status, as a string."""


class OpenAIError(msgspec.Struct):
    error: ErrorDetail


_ERRORS = {
    400: ResponseSpec(OpenAIError, description="Neither `prompt` nor `messages`, or a malformed body"),
    401: ResponseSpec(OpenAIError, description="No API key, or not a valid one"),
    413: ResponseSpec(OpenAIError, description=f"A body over {MAX_BODY} bytes"),
}


_CALLER = "token_counter_caller"
"""Where the guard leaves the admitted key for the handler (the request's scope state)."""


async def client_key(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Runs before the body is read: a call without a valid key is a 401 whatever its body. The key is admitted
    here, once per call: a count may ask a replica, so it takes one unit of the key's rate limit."""
    gateway = gateway_of(connection)
    scope: HTTPScope = connection.scope  # type: ignore[assignment]
    key = gateway.authenticate(credentials(scope)[0], client_address(scope))
    await gateway.admit(key, spend=False)
    connection.scope.setdefault("state", {})[_CALLER] = key


def _caller(request: Request[Any, Any, Any]) -> KeyInfo:
    """The key the guard authenticated and admitted."""
    key: KeyInfo = request.scope["state"][_CALLER]
    return key


@post(
    "/utils/token_counter",
    status_code=HTTP_200_OK,
    guards=[client_key],
    request_max_body_size=MAX_BODY,
    responses=_ERRORS,
)
async def token_counter(
    request: Request[Any, Any, Any], token_counter: NamedDependency[TokenCounter], data: JSONBody[TokenCounterIn]
) -> TokenCounterOut:
    counted = await token_counter.count(_caller(request), data.model, _source(data))
    return TokenCounterOut(counted.total_tokens, data.model, counted.model_used, counted.tokenizer_type)


def _source(data: TokenCounterIn) -> Prompt | Messages:
    if data.prompt is not None and data.messages is not None:
        raise BadBody("Give either `prompt` or `messages`, not both.", "messages")
    if data.messages is not None:
        return Messages(tuple(_message(i, m) for i, m in enumerate(data.messages)))
    if data.prompt is not None:
        return data.prompt if isinstance(data.prompt, str) else tuple(data.prompt)
    raise BadBody("Either `prompt` or `messages` is required.", "messages")


def _message(index: int, m: ChatMessage) -> Message:
    if not isinstance(m.content, list):
        return Message(m.role, m.content, name=m.name)
    texts: list[str] = []
    images = 0
    for j, part in enumerate(m.content):
        if part.type == "text" and part.text is not None:
            texts.append(part.text)
        elif part.type == "image_url":
            images += 1
        else:
            where = f"messages[{index}].content[{j}]"
            raise BadBody(f"{where}: only `text` parts (with a `text`) and `image_url` parts are counted.", where)
    return Message(m.role, tuple(texts), images, m.name)


def _on_error(_: Request[Any, Any, Any], exc: GatewayError | BadBody) -> Response[bytes]:
    return openai_error(exc).response()


def _on_validation(_: Request[Any, Any, Any], exc: ValidationException) -> Response[bytes]:
    """Litestar's body errors (not JSON, wrong types, missing fields) as the envelope's 400."""
    for item in exc.extra if isinstance(exc.extra, list) else []:
        if isinstance(item, dict) and item.get("message"):
            message, key = str(item["message"]), item.get("key")
            if key == "data":  # the body as a whole
                key = None
                if message == "'data'":  # an empty or `null` body: Litestar reports the missing kwarg's KeyError
                    message = "A JSON object body is required."
            return openai_error(BadBody(message, str(key) if key else None)).response()
    return openai_error(BadBody(str(exc.detail))).response()


def _on_http(_: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    """Litestar's other refusals (a body over MAX_BODY: 413) in the same envelope."""
    error = ErrorDetail(str(exc.detail), "invalid_request_error", None, str(exc.status_code))
    return Response(msgspec.json.encode(OpenAIError(error)), status_code=exc.status_code, media_type="application/json")


def litellm_router() -> Router:
    return Router(
        path="/",
        route_handlers=[token_counter],
        dependencies=SERVICES,
        tags=["litellm"],
        exception_handlers={
            ValidationException: _on_validation,
            HTTPException: _on_http,
            GatewayError: _on_error,
            BadBody: _on_error,
        },
    )
