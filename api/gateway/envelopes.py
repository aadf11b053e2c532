"""Error answers of the gateway in each surface's shape: OpenAI's (LiteLLM's) envelope, or the toolkit's."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
from litestar import Response

from api.gateway.bodies import BadBody
from orchestrator.gateway.flow import (
    Forbidden,
    GatewayError,
    IpRefused,
    NoReplica,
    PaymentRequired,
    RateLimited,
    Unauthorized,
    UnknownModel,
    UpstreamFailed,
)
from orchestrator.gateway.hops import LoopDetected
from orchestrator.gateway.priority import QueueTimeout


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def response(self) -> Response[bytes]:
        """The same answer from a Litestar route."""
        headers = {name.decode(): value.decode() for name, value in self.headers}
        return Response(self.body, status_code=self.status, media_type="application/json", headers=headers)


def _openai(status: int, message: str, kind: str, param: str | None = None, *extra: tuple[bytes, bytes]) -> Answer:
    body = {"error": {"message": message, "type": kind, "param": param, "code": str(status)}}
    return Answer(status, msgspec.json.encode(body), extra)


_SEE_MODELS = "Call `/v1/models` to view available models for your key."


def openai_error(e: Exception) -> Answer:  # noqa: PLR0911, PLR0912  (one answer per error kind)
    match e:
        case IpRefused():
            return _openai(401, str(e), "authentication_error")
        case Unauthorized():
            return _openai(401, "Invalid API key.", "authentication_error")
        case RateLimited():
            return _openai(429, str(e), "rate_limit_exceeded", None, (b"retry-after", b"60"))
        case PaymentRequired():
            return _openai(402, str(e), "insufficient_quota")
        case UnknownModel() if e.connector:
            return _openai(400, f"The model [{e.model}] is not found.", "invalid_request_error", "model")
        case UnknownModel():
            message = f"Invalid model name passed in model={e.model}. {_SEE_MODELS}"
            return _openai(400, message, "invalid_request_error", "model")
        case Forbidden():
            return _openai(403, str(e), "permission_error", "model")
        case NoReplica():
            message = f"No replica of model {e.model} is ready; try again shortly."
            return _openai(503, message, "service_unavailable", None, (b"retry-after", b"5"))
        case UpstreamFailed():
            return _openai(502, str(e), "upstream_unreachable", None, (b"retry-after", b"5"))
        case BadBody():
            return _openai(400, e.message, "invalid_request_error", e.param)
        case TooLarge():
            return _openai(413, str(e), "invalid_request_error")
        case QueueTimeout():
            return _openai(408, str(e), "timeout_error", None, (b"retry-after", b"5"))
        case LoopDetected():
            return _openai(508, str(e), "loop_detected")
    raise TypeError(f"not a gateway error: {e!r}")


def toolkit_error(e: Exception) -> Answer:  # noqa: PLR0911  (one answer per error kind)
    match e:
        case IpRefused():
            return Answer(401, b'{"error":"Unauthorized IP address"}')
        case Unauthorized():
            return Answer(401, b'{"error":"Invalid API key."}')
        case RateLimited():
            body = {"error": "rate_limit_exceeded", "message": str(e), "allowed_rpm": e.allowed_rpm}
            return Answer(429, msgspec.json.encode(body))
        case PaymentRequired():
            return Answer(402, msgspec.json.encode({"error": str(e)}))
        case UnknownModel():
            return Answer(400, b'{"error":"Invalid Model"}')
        case Forbidden():
            return Answer(403, msgspec.json.encode({"error": str(e)}))
        case NoReplica() | UpstreamFailed():
            return Answer(400, b'{"error":"No Replica available / ready."}')
        case BadBody():
            errors = e.errors if e.errors is not None else {e.param or "_schema": [e.message]}
            return Answer(400, msgspec.json.encode({"errors": errors}))
        case TooLarge():
            return Answer(413, msgspec.json.encode({"error": str(e)}))
    raise TypeError(f"not a gateway error: {e!r}")


class TooLarge(GatewayError):
    pass
