"""LlmEndpoint's completions: its request, its credit price, and a call made through the gateway.

A call costs (characters of the user's messages x the model's input rate + max_tokens x its output rate),
known before the call, reserved off the key's balance in the same step as its check (402 when short: with several
instances, against every instance's credits taken), kept when the call delivers and given back once otherwise. The
request becomes an OpenAI chat request for the replica: `num_context`, when given, as vLLM's
`truncate_prompt_tokens` (the prompt keeps its last num_context tokens, as a context window does) and
`output_format: "json"` as `response_format: {"type": "json_object"}`.

    LlmEndpointError (a Refusal, and LlmEndpoint's exact words)
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import Enum
from functools import cached_property
from typing import Annotated, Any, Literal

import msgspec

from orchestrator.domain import money
from orchestrator.gateway.catalog import SERVER_ADMIN, KeyInfo, ModelInfo
from orchestrator.gateway.flow import (
    Call,
    Forbidden,
    Gateway,
    NoReplica,
    Outcome,
    RateLimited,
    UnknownModel,
    UpstreamFailed,
    usage_of,
)
from orchestrator.gateway.http1 import BrokenOff

REQUIRED = "messages, model, max_tokens, and temperature are required"
INVALID = "Invalid request"
NO_PRICING = "Model pricing not found"
NO_CREDITS = "Insufficient credits"
NO_HOSTS = "Max attempts reached - no available hosts"
MAX_TOKENS = 1_000_000
MAX_CONTEXT = 1_048_576


class Refusal(Enum):
    """Why a call was refused; the api gives each its status."""

    UNAUTHENTICATED = "unauthenticated"
    INVALID = "invalid"
    NO_HOST = "no_host"
    ENGINE_REFUSED = "engine_refused"
    NO_CREDITS = "no_credits"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    RATE_LIMITED = "rate_limited"
    HOST_FAILED = "host_failed"


class LlmEndpointError(Exception):
    def __init__(self, refusal: Refusal, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.refusal = refusal
        self.message = message
        """LlmEndpoint's exact words, where it has some."""
        self.detail = detail
        """What exactly was wrong, beside LlmEndpoint's fixed message."""


class Message(msgspec.Struct):
    role: Literal["user", "assistant", "system"]
    content: str


class Request(msgspec.Struct, omit_defaults=True):
    messages: Annotated[list[Message], msgspec.Meta(min_length=1)] | msgspec.UnsetType = msgspec.UNSET
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=255)] | msgspec.UnsetType = msgspec.UNSET
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS)] | msgspec.UnsetType = msgspec.UNSET
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] = 0.7
    num_context: Annotated[int, msgspec.Meta(ge=1, le=MAX_CONTEXT)] | None = None
    stream: bool = False
    output_format: Literal["default", "json"] = "default"


@dataclass(frozen=True)
class Valid:
    """A request with every required field, as the engine and the task queue get it."""

    messages: list[Message]
    model: str
    max_tokens: int
    temperature: float
    num_context: int | None
    """None: the engine's own context length (LlmEndpoint's 2048 would be refused by an engine with less)."""
    stream: bool
    output_format: Literal["default", "json"]

    @cached_property
    def engine_body(self) -> bytes:
        """The OpenAI chat request the replica gets (encoded once: sent, then recorded)."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in self.messages],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stream": self.stream,
        }
        if self.num_context is not None:
            body["truncate_prompt_tokens"] = self.num_context
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if self.output_format == "json":
            body["response_format"] = {"type": "json_object"}
        return msgspec.json.encode(body)

    def stored(self) -> str:
        """The request as the task queue keeps it (JSON)."""
        return msgspec.json.encode(
            Request(
                self.messages,
                self.model,
                self.max_tokens,
                self.temperature,
                self.num_context,
                False,
                self.output_format,
            )
        ).decode()


_DECODER = msgspec.json.Decoder(Request)


def parse(raw: bytes, *, stream_allowed: bool = True) -> Valid:
    try:
        req = _DECODER.decode(raw)
    except msgspec.ValidationError as e:
        raise LlmEndpointError(Refusal.INVALID, INVALID, str(e)) from e
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:  # msgspec: bad UTF-8, nested too deep
        raise LlmEndpointError(Refusal.INVALID, INVALID, f"the body is not JSON: {type(e).__name__}") from e
    if (
        isinstance(req.messages, msgspec.UnsetType)
        or isinstance(req.model, msgspec.UnsetType)
        or isinstance(req.max_tokens, msgspec.UnsetType)
    ):
        raise LlmEndpointError(Refusal.INVALID, REQUIRED)
    stream = req.stream and stream_allowed
    return Valid(req.messages, req.model, req.max_tokens, req.temperature, req.num_context, stream, req.output_format)


def cost(req: Valid, rate_in: int, rate_out: int) -> int:
    """What the call costs, in units: the user's characters at the input rate, max_tokens at the output rate."""
    chars = sum(len(m.content) for m in req.messages if m.role == "user")
    return chars * rate_in + req.max_tokens * rate_out


class _Choice(msgspec.Struct):
    message: _Text | None = None


class _Text(msgspec.Struct):
    content: str | None = None


class _Answer(msgspec.Struct):
    choices: list[_Choice] = []


class _Error(msgspec.Struct):
    message: str | None = None


class _Failure(msgspec.Struct):
    error: _Error | str | None = None
    message: str | None = None


_ANSWER = msgspec.json.Decoder(_Answer)
_FAILURE = msgspec.json.Decoder(_Failure)


def answer_text(payload: bytes) -> str:
    try:
        choices = _ANSWER.decode(payload).choices
    except msgspec.DecodeError as e:
        raise LlmEndpointError(
            Refusal.HOST_FAILED, "The model's host answered something that is not a completion."
        ) from e
    message = choices[0].message if choices else None
    return (message.content or "") if message is not None else ""


def engine_error(status: int, payload: bytes) -> LlmEndpointError:
    """An engine's answer other than 200: its 4xx as a refusal with its message, anything else as a host failure."""
    try:
        failure = _FAILURE.decode(payload)
        error = failure.error
        text = error.message if isinstance(error, _Error) else error or failure.message
    except msgspec.DecodeError:
        text = None
    if 400 <= status < 500:
        return LlmEndpointError(Refusal.ENGINE_REFUSED, text or INVALID)
    return LlmEndpointError(Refusal.HOST_FAILED, "The model's host failed.", text)


class Completions:
    """LlmEndpoint calls through the gateway: admission, credits, the call, and its charge."""

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway

    async def admit(self, key: KeyInfo, req: Valid, *, reserve: bool = True) -> tuple[ModelInfo, int]:
        """(the model, the call's cost in units), or the refusal; nothing is sent anywhere yet.

        `reserve`: the cost is taken off the key's balance now, in the same step as its check, so that concurrent
        calls (on every instance) cannot spend the same credits; `finish` keeps it when the call delivered, and `open`
        or `finish` (whichever ends the call) gives it back otherwise."""
        gw = self._gw
        rate = gw.catalog.rates.get(req.model)
        if rate is None:
            raise LlmEndpointError(Refusal.INVALID, NO_PRICING)
        try:
            await gw.admit(key, spend=False)
            model = gw.resolve(key, req.model, fallback=False)
        except RateLimited as e:
            raise LlmEndpointError(Refusal.RATE_LIMITED, str(e)) from e
        except Forbidden as e:
            raise LlmEndpointError(Refusal.FORBIDDEN, str(e)) from e
        except UnknownModel as e:
            raise LlmEndpointError(Refusal.NO_HOST, NO_HOSTS, f"no model named {req.model} is served") from e
        price = cost(req, rate.input, rate.output)
        if key is not SERVER_ADMIN:
            ledger, month = gw.catalog.ledger, money.month_of()
            if not (ledger.take_credits(key.id, price, month) if reserve else ledger.balance(key.id, month) >= price):
                raise LlmEndpointError(Refusal.NO_CREDITS, NO_CREDITS)
        return model, price

    def _refund(self, key: KeyInfo, price: int) -> None:
        if key is not SERVER_ADMIN:
            self._gw.catalog.ledger.give_credits(key.id, price)

    async def open(self, key: KeyInfo, model: ModelInfo, req: Valid, price: int) -> Call:
        """The call to a replica, once admitted (and reserved); the reservation is given back if none answers."""
        # A hold of nothing: its credits are reserved apart, but the key's call is then known to be in flight.
        hold = await self._gw.hold(key, model, prompt_bound=0, max_tokens=0)
        try:
            return await self._gw.open(model.name, "/chat/completions", req.engine_body, hold=hold)
        except (NoReplica, UpstreamFailed) as e:
            self._refund(key, price)
            raise LlmEndpointError(Refusal.NO_HOST, NO_HOSTS, str(e)) from e
        except BaseException:
            self._refund(key, price)
            raise

    def finish(
        self, call: Call, key: KeyInfo, model: ModelInfo, req: Valid, outcome: Outcome, *, price: int
    ) -> asyncio.Future[None] | None:
        """Account for the call: its credits are kept when it delivered (a whole answer, or any of a stream, even one
        the client then left), and given back otherwise. The future is done once the call's record is on disk."""
        delivered = outcome.status == 200 or outcome.first_byte is not None
        if not delivered:
            self._refund(key, price)
        return self._gw.finish(
            call,
            key,
            model,
            "chat",
            req.engine_body,
            outcome,
            stream=req.stream,
            session=None,
            credits=price if delivered else 0,
        )

    async def complete(self, key: KeyInfo, req: Valid) -> str:
        """A whole (non-stream) completion's text; raises LlmEndpointError."""
        model, price = await self.admit(key, req)
        call = await self.open(key, model, req, price)
        outcome = Outcome(500)
        try:
            payload = await call.response.read()
            outcome = Outcome(call.response.status, usage_of(payload), payload)
        except (BrokenOff, TimeoutError) as e:
            outcome.status = 502
            raise LlmEndpointError(
                Refusal.NO_HOST, NO_HOSTS, f"the host broke off its answer: {type(e).__name__}"
            ) from e
        finally:
            durable = self.finish(call, key, model, req, outcome, price=price)
        if durable is not None:
            await durable  # the answer goes out only once the call is on disk
        if outcome.status != 200:
            raise engine_error(outcome.status, payload)
        return answer_text(payload)
