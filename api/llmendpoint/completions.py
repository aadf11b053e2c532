"""LlmEndpoint's `POST /api/v1/completions` as raw ASGI: `{"success": true, "response": "..."}`, or an NDJSON
stream of `{"role": "assistant", "content": "..."}` lines read off the replica's SSE stream."""

from __future__ import annotations

import time

import msgspec
from litestar.types import HTTPScope, Receive, Send

from api.gateway.envelopes import Answer, TooLarge
from api.gateway.relay import Commit, Settlement, until_disconnected
from api.gateway.routes import answer, client_address, credentials, read_body
from orchestrator.gateway.catalog import KeyInfo, ModelInfo
from orchestrator.gateway.flow import Call, Gateway, IpRefused, Outcome, Unauthorized, Usage
from orchestrator.gateway.http1 import BrokenOff
from orchestrator.platform.sse import EventReader, documents
from orchestrator.runtime.metrics import ServerMetrics
from orchestrator.surfaces.llmendpoint.completions import (
    Completions,
    LlmEndpointError,
    Refusal,
    Valid,
    engine_error,
    parse,
)

COMPLETIONS_PATH = "/api/v1/completions"
NO_KEY = "Authorization header required"
BAD_KEY = "Invalid API key"


STATUS = {
    Refusal.UNAUTHENTICATED: 401,
    Refusal.INVALID: 400,
    Refusal.NO_HOST: 400,  # LlmEndpoint's "Max attempts reached - no available hosts" is a 400
    Refusal.ENGINE_REFUSED: 400,
    Refusal.NO_CREDITS: 402,
    Refusal.FORBIDDEN: 403,
    Refusal.NOT_FOUND: 404,
    Refusal.RATE_LIMITED: 429,
    Refusal.HOST_FAILED: 502,
}


def failure(status: int, message: str, detail: str | None = None) -> Answer:
    body: dict[str, object] = {"success": False, "message": message}
    if detail:
        body["detail"] = detail
    return Answer(status, msgspec.json.encode(body))


def refused(e: LlmEndpointError) -> Answer:
    return failure(STATUS[e.refusal], e.message, e.detail)


def authenticate(gateway: Gateway, scope: HTTPScope) -> KeyInfo:
    """The key of an LlmEndpoint request (`Authorization: <key>` or `Bearer <key>`), with its exact refusals."""
    raw_key, _ = credentials(scope)
    if not raw_key:
        raise LlmEndpointError(Refusal.UNAUTHENTICATED, NO_KEY)
    try:
        return gateway.authenticate(raw_key, client_address(scope))
    except IpRefused as e:
        raise LlmEndpointError(Refusal.UNAUTHENTICATED, str(e)) from e
    except Unauthorized as e:
        raise LlmEndpointError(Refusal.UNAUTHENTICATED, BAD_KEY) from e


class _Delta(msgspec.Struct):
    content: str | None = None


class _StreamChoice(msgspec.Struct):
    delta: _Delta | None = None


class _Event(msgspec.Struct):
    choices: list[_StreamChoice] = []
    usage: Usage | None = None


_EVENT = msgspec.json.Decoder(_Event)
_LINE = msgspec.json.Encoder()


class CompletionRoute:
    def __init__(self, gateway: Gateway, metrics: ServerMetrics) -> None:
        self._gw = gateway
        self._completions = Completions(gateway)
        self._metrics = metrics

    async def __call__(self, scope: HTTPScope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        self._metrics.inflight.inc()
        status = 500
        try:
            status = await self._serve(scope, receive, send)
        finally:
            self._metrics.inflight.dec()
            self._metrics.observe("llmendpoint", status, time.perf_counter() - started)

    async def _serve(self, scope: HTTPScope, receive: Receive, send: Send) -> int:
        if scope["method"] != "POST":
            return await answer(send, failure(405, "Method Not Allowed"))
        try:
            key = authenticate(self._gw, scope)
            req = parse(await read_body(receive))
            if not req.stream:
                text = await self._completions.complete(key, req)
                return await answer(send, Answer(200, msgspec.json.encode({"success": True, "response": text})))
            model, price = await self._completions.admit(key, req)
            call = await self._completions.open(key, model, req, price)
        except LlmEndpointError as e:
            return await answer(send, refused(e))
        except TooLarge as e:
            return await answer(send, failure(413, str(e)))
        return await self._stream(call, key, model, req, price, send, receive)

    async def _stream(  # noqa: PLR0917  (one call site)
        self, call: Call, key: KeyInfo, model: ModelInfo, req: Valid, price: int, send: Send, receive: Receive
    ) -> int:
        commit = Settlement(
            "chat",
            req.engine_body,
            lambda outcome: self._completions.finish(call, key, model, req, outcome, price=price),
        )
        outcome = commit.outcome
        try:
            outcome.status = await until_disconnected(lambda: _relay_ndjson(call, send, outcome, commit), receive)
        finally:
            await commit()
        return outcome.status


async def _relay_ndjson(call: Call, send: Send, outcome: Outcome, commit: Commit) -> int:
    """The replica's SSE events as NDJSON lines, filling `outcome` on the way; the end waits for `commit`."""
    response = call.response
    if response.status != 200:
        try:
            payload = await response.read()
        except (BrokenOff, TimeoutError):
            payload = b""
        outcome.status, outcome.answer = response.status, payload
        await commit()
        return await answer(send, refused(engine_error(response.status, payload)))
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/x-ndjson"), (b"cache-control", b"no-cache")],
        }
    )
    reader = EventReader()
    outcome.status = 200
    events: list[bytes] = []  # the replica's events, for the call's record
    outcome.answer = events
    try:
        async for chunk in response.chunks():
            block = reader.feed(chunk)
            if not block:
                continue
            events.append(block)
            lines = bytearray()
            for document in documents(block):
                try:
                    parsed = _EVENT.decode(document)
                except msgspec.DecodeError:
                    continue
                outcome.usage = parsed.usage or outcome.usage
                for choice in parsed.choices[:1]:
                    if choice.delta is not None and choice.delta.content:
                        lines += _LINE.encode({"role": "assistant", "content": choice.delta.content}) + b"\n"
            if lines:
                if outcome.first_byte is None:
                    outcome.first_byte = time.perf_counter()
                await send({"type": "http.response.body", "body": bytes(lines), "more_body": True})
    except (BrokenOff, TimeoutError):
        outcome.status = 502  # the replica broke off mid-stream: end ours cleanly
    await commit()
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    return outcome.status
