"""The gateway's routes as raw ASGI: which path is which call, and the handler that serves it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
from litestar.types import HTTPScope, Receive, Send

from api.gateway.bodies import BadBody, Parsed, Queued, parse, queue_fields, with_fields
from api.gateway.envelopes import Answer, TooLarge, openai_error, toolkit_error
from api.gateway.relay import (
    CLIENT_CLOSED,
    OpenAIStream,
    Settlement,
    StreamShape,
    ToolkitStream,
    relay_stream,
    relay_whole,
    until_disconnected,
)
from orchestrator.billing.records import CallKind
from orchestrator.gateway.catalog import KeyInfo, ModelInfo
from orchestrator.gateway.flow import Call, Gateway, GatewayError, Hold, UpstreamFailed
from orchestrator.gateway.priority import PriorityQueues
from orchestrator.runtime.metrics import ServerMetrics

MAX_BODY = 4 * 1024 * 1024
MAX_SESSION_ID = 128


@dataclass(frozen=True, slots=True)
class Route:
    kind: CallKind | None  # None: the model list
    toolkit: bool = False
    path_model: str | None = None
    queued: bool = False
    """`/queue/chat/completions`: waits its turn in the model's priority queue."""


EXACT_ROUTES = {
    "/v1/chat/completions": Route("chat"),
    "/chat/completions": Route("chat"),
    "/api/v1/chat/completions": Route("chat", toolkit=True),
    "/queue/chat/completions": Route("chat", queued=True),
    "/v1/completions": Route("completions"),
    "/completions": Route("completions"),
    "/v1/models": Route(None),
    "/models": Route(None),
}
MODEL_PREFIXES = ("/engines/", "/openai/deployments/")
MODEL_TAILS: tuple[tuple[str, CallKind], ...] = (("/chat/completions", "chat"), ("/completions", "completions"))


def match(path: str) -> Route | None:
    route = EXACT_ROUTES.get(path)
    if route is not None:
        return route
    for prefix in MODEL_PREFIXES:
        if path.startswith(prefix):
            rest = path[len(prefix) :]
            for tail, kind in MODEL_TAILS:
                if rest.endswith(tail) and len(rest) > len(tail):
                    return Route(kind, path_model=rest[: -len(tail)])
    return None


def path_of(kind: CallKind) -> str:
    return "/chat/completions" if kind == "chat" else "/completions"


def client_address(scope: HTTPScope) -> str | None:
    """The address the request came from (as the server saw it: no proxy header is trusted)."""
    client = scope.get("client")
    return client[0] if client else None


def credentials(scope: HTTPScope) -> tuple[str | None, str | None]:
    """(the API key, the Session-Id) from the request's headers, in one pass."""
    key = session = None
    for name, value in scope["headers"]:
        if name == b"authorization" and key is None:
            scheme, _, token = value.decode("latin-1").partition(" ")
            key = token.strip() if scheme.lower() == "bearer" else value.decode("latin-1").strip()
        elif name in (b"api-key", b"x-api-key") and key is None:
            key = value.decode("latin-1").strip()
        elif name == b"session-id":
            session = value.decode("utf-8", "replace").strip() or None
    return key, session


async def read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        chunk: bytes = message.get("body", b"")  # type: ignore[assignment]
        size += len(chunk)
        if size > MAX_BODY:
            raise TooLarge(f"Request body larger than {MAX_BODY} bytes.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def answer(send: Send, reply: Answer) -> int:
    """Send a whole JSON answer; returns its status."""
    headers = [(b"content-type", b"application/json"), *reply.headers]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body, "more_body": False})
    return reply.status


class Admission:
    """A queued request let through: ends (once) when the gateway picks its replica, or when it gives up."""

    __slots__ = ("_model", "_open", "_queues")

    def __init__(self, queues: PriorityQueues, model: str) -> None:
        self._queues, self._model, self._open = queues, model, True

    def end(self) -> None:
        if self._open:
            self._open = False
            self._queues.sent(self._model)


@dataclass(slots=True, frozen=True)
class Admitted:
    """A call let through admission, holding its worst case against its key's spend."""

    key: KeyInfo
    model: ModelInfo
    kind: CallKind
    raw: bytes
    """The body as the client sent it (recorded)."""
    parsed: Parsed
    body: bytes
    """The body as the replica gets it."""
    queued: Queued | None
    session: str | None
    hold: Hold


class GatewayRoutes:
    def __init__(self, gateway: Gateway, metrics: ServerMetrics, queues: PriorityQueues) -> None:
        self._gw = gateway
        self._metrics = metrics
        self._queues = queues

    async def __call__(self, scope: HTTPScope, receive: Receive, send: Send, route: Route) -> None:
        started = time.perf_counter()
        self._metrics.inflight.inc()
        status = 500
        try:
            status = await self._serve(scope, receive, send, route)
        finally:
            self._metrics.inflight.dec()
            self._metrics.observe(route.kind or "models", status, time.perf_counter() - started)

    async def _serve(self, scope: HTTPScope, receive: Receive, send: Send, route: Route) -> int:
        errors = toolkit_error if route.toolkit else openai_error
        method = scope["method"]
        if route.kind is None:
            return await (self._models(scope, send) if method == "GET" else answer(send, _not_allowed(route)))
        if method != "POST":
            return await answer(send, _not_allowed(route))
        try:
            admitted = await self._admit(scope, receive, route, route.kind)
        except (GatewayError, BadBody) as e:
            return await answer(send, errors(e))
        try:
            call = await self._open(admitted, receive)
        except GatewayError as e:  # the hold ended with the call that did not open
            return await answer(send, errors(e))
        if call is None:
            self._gw.let_go(admitted.hold)
            return CLIENT_CLOSED
        return await self._relay(admitted, call, send, receive, errors)

    async def _admit(self, scope: HTTPScope, receive: Receive, route: Route, kind: CallKind) -> Admitted:
        """Key, limits, body, model and spend: everything checked before a replica is asked."""
        gw = self._gw
        raw_key, session = credentials(scope)
        key = gw.authenticate(raw_key, client_address(scope))
        await gw.admit(key)
        if session is not None and len(session) > MAX_SESSION_ID:
            raise BadBody(f"Session-Id must be at most {MAX_SESSION_ID} characters.")
        raw = await read_body(receive)
        parsed = parse(raw, kind, path_model=route.path_model, toolkit=route.toolkit)
        model = gw.resolve(key, parsed.model)
        body = parsed.body if model.name == parsed.model else with_fields(parsed.body, model=model.name)
        queued = queue_fields(body) if route.queued else None
        if queued is not None:
            body = queued.body
        # The body's bytes bound its prompt tokens (a token is at least a byte, and the JSON around the texts
        # outweighs a chat template's tokens).
        hold = await gw.hold(
            key,
            model,
            prompt_bound=len(body),
            max_tokens=parsed.max_tokens,
            outputs=parsed.outputs,
            media=parsed.media,
        )
        return Admitted(key, model, kind, raw, parsed, body, queued, session, hold)

    async def _open(self, a: Admitted, receive: Receive) -> Call | None:
        """The call to a replica (after its turn in the priority queue, if queued); None if the client left."""
        if a.queued is None:
            return await self._gw.open(a.model.name, path_of(a.kind), a.body, hold=a.hold)
        try:
            turn = await self._turn(a.model.name, a.queued, receive)
        except BaseException:  # timed out in the queue, or cancelled: no call will carry the hold
            self._gw.let_go(a.hold)
            raise
        if turn == CLIENT_CLOSED:
            return None
        admission = Admission(self._queues, a.model.name)
        try:
            return await self._gw.open(a.model.name, path_of(a.kind), a.body, hold=a.hold, on_picked=admission.end)
        finally:
            admission.end()

    async def _relay(
        self, a: Admitted, call: Call, send: Send, receive: Receive, errors: Callable[[Exception], Answer]
    ) -> int:
        """Relay the answer; the call is accounted for (fee, record on disk) before its last byte, or when it ends
        otherwise (the client left, the replica broke off)."""
        commit = Settlement(
            a.kind,
            a.raw,
            lambda outcome: self._gw.finish(
                call, a.key, a.model, a.kind, a.raw, outcome, stream=a.parsed.stream, session=a.session
            ),
        )
        outcome = commit.outcome
        extra = () if a.queued is None else ((b"x-litellm-priority", str(a.queued.priority).encode()),)

        async def relay() -> int:
            if a.parsed.stream:
                return await relay_stream(call, send, outcome, commit, shape=_shape(a.parsed), extra=extra)
            return await relay_whole(call, send, outcome, commit, extra=extra)

        try:
            outcome.status = await until_disconnected(relay, receive)
        except UpstreamFailed as e:  # broke off before anything was sent
            outcome.status = await answer(send, errors(e))
        finally:
            await commit()
        return outcome.status

    async def _turn(self, model: str, queued: Queued, receive: Receive) -> int:
        """Wait in the model's priority queue (CLIENT_CLOSED if the client leaves meanwhile)."""

        async def wait() -> int:
            await self._queues.wait_turn(model, queued.priority, queued.timeout_s)
            return 0

        return await until_disconnected(wait, receive)

    async def _models(self, scope: HTTPScope, send: Send) -> int:
        try:
            key = self._gw.authenticate(credentials(scope)[0], client_address(scope))
        except GatewayError as e:
            return await answer(send, openai_error(e))
        data = [
            {"id": m.name, "object": "model", "created": m.created, "owned_by": m.provider, "multiple": m.multiple}
            for m in self._gw.visible_models(key)
        ]
        return await answer(send, Answer(200, msgspec.json.encode({"object": "list", "data": data})))


def _shape(parsed: Parsed) -> StreamShape:
    if parsed.raw_stream_response is not None:  # the toolkit's route
        return ToolkitStream(raw_stream_response=parsed.raw_stream_response)
    return OpenAIStream(keep_usage_chunk=parsed.client_wants_usage)


def _not_allowed(route: Route) -> Answer:
    if route.toolkit:
        return Answer(405, b'{"error":"Method Not Allowed"}')
    body = {"error": {"message": "Method Not Allowed", "type": "invalid_request_error", "param": None, "code": "405"}}
    return Answer(405, msgspec.json.encode(body))
