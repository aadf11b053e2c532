"""vLLM-compatible engine simulator: OpenAI endpoints, /tokenize, /metrics, fault knobs and a request log, no GPU.

Beside vLLM's API, for tests: GET/POST /sim/faults reads and sets the fault knobs (and the pace, `tokens_per_s`,
and the batch's size, `max_num_seqs`, so that an engine started by someone else can be made slow or a queue);
GET /sim/requests answers {"requests": [{"received": unix time, "finished": unix time or null while running,
"path": "/v1/...", "body": the request's JSON (its text if it was not JSON)}, ... oldest first], "peak_running":
the most completion requests in flight at once since start or the last clear}, and DELETE /sim/requests clears both.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import importlib
import importlib.util
import itertools
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Final, TypeVar

import click
import msgspec
from aiohttp import web

from orchestrator.enginesim.bodies import Refusal, chat_request, completion_request, tokenize_request
from orchestrator.enginesim.metrics import EngineMetrics
from orchestrator.enginesim.plans import Limits, Plan, chat_plan, completion_plan, unknown_model
from orchestrator.enginesim.request_log import RequestLog
from orchestrator.enginesim.text import CHAT, TEXT, AnswerShape, Texts, chat_ids, choices, finished, prompt_ids

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_T = TypeVar("_T")

_POLL_S: Final = 0.05  # how often an idle (hung or stalled) handler checks whether its client went away
_MAX_BODY: Final = 64 * 1024 * 1024  # long prompts in benchmarks must not trip aiohttp's 1 MiB default
_BACKLOG: Final = 4096
_JSON: Final = "application/json"
_SSE_HEADERS: Final = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
_METRICS_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
_DONE: Final = b"data: [DONE]\n\n"
_UNAUTHORIZED: Final = msgspec.json.encode({"error": "Unauthorized"})


@dataclass(frozen=True)
class SimConfig:
    model: str  # served model name
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # like vLLM --api-key: guards the /v1/ routes only
    startup_delay_s: float = 0.0  # the port stays closed this long, as while vLLM loads weights
    tokens_per_s: float = 0.0  # 0: no sleep at all; else the pace of stream chunks (and of non-stream answers)
    ttft_s: float = 0.0  # sleep before the first token, or before the whole non-stream answer
    max_tokens: int = 16  # where the simulated model stops by itself (finish "stop") when the request names no length
    max_model_len: int = 4096
    max_logprobs: int = 20  # like vLLM --max-logprobs: the most top logprobs a request may ask for; -1 no limit
    fail_rate: float = 0.0  # fraction of completion requests answered 500, deterministically spread
    hang: bool = False  # completion requests never answer (until the client leaves)
    crash_after: int | None = None  # the request after this many completion requests exits the process
    stall_after_chunks: int | None = None  # streams go silent after this many events, connection kept open
    request_log: int = 1000  # completion requests kept for GET /sim/requests (bodies as received)
    max_num_seqs: int | None = None  # like vLLM --max-num-seqs: requests run at once; the rest wait (FIFO)


_Rate = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
_Pace = Annotated[float, msgspec.Meta(ge=0.0)]
_Count = Annotated[int, msgspec.Meta(ge=0)]
_Seqs = Annotated[int, msgspec.Meta(ge=1)]


class _Faults(msgspec.Struct):
    fail_rate: _Rate = 0.0
    hang: bool = False
    stall_after_chunks: _Count | None = None
    dead: bool = False
    tokens_per_s: _Pace = 0.0
    max_num_seqs: _Seqs | None = None


class _FaultPatch(msgspec.Struct, forbid_unknown_fields=True):
    fail_rate: _Rate | msgspec.UnsetType = msgspec.UNSET
    hang: bool | msgspec.UnsetType = msgspec.UNSET
    stall_after_chunks: _Count | msgspec.UnsetType | None = msgspec.UNSET
    dead: bool | msgspec.UnsetType = msgspec.UNSET
    tokens_per_s: _Pace | msgspec.UnsetType = msgspec.UNSET
    max_num_seqs: _Seqs | msgspec.UnsetType | None = msgspec.UNSET


def _json(body: bytes, status: int = 200) -> web.Response:
    return web.Response(status=status, body=body, content_type=_JSON)


def _error(status: int, kind: str, message: str) -> web.Response:
    error = {"message": message, "type": kind, "param": None, "code": status}
    return _json(msgspec.json.encode({"error": error}), status)


def _bad_request(message: str) -> web.Response:
    return _error(400, "BadRequestError", message)


def _refused(refusal: Refusal) -> web.Response:
    return _error(refusal.status, refusal.kind, refusal.message)


def _decode(decoder: msgspec.json.Decoder[_T], body: bytes) -> _T | web.Response:  # the fault patches
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as exc:  # malformed JSON and schema violations alike
        return _bad_request(str(exc))


class _Sim:
    """One simulated engine: its knobs, its counters and the request handlers."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.faults = _Faults(
            config.fail_rate,
            config.hang,
            config.stall_after_chunks,
            tokens_per_s=config.tokens_per_s,
            max_num_seqs=config.max_num_seqs,
        )
        self.model_json = msgspec.json.encode(config.model)
        self.closing = False
        self.completion_requests = 0
        self.fail_credit = 0.0
        self.metrics = EngineMetrics(config.model, config.max_model_len)
        self.batch = 0
        """Requests in the running batch: at most `max_num_seqs`, the others wait in `line`."""
        self.line: collections.deque[asyncio.Future[None]] = collections.deque()
        """Requests waiting for room in the batch, first come first (`vllm:num_requests_waiting`)."""
        self.ids = itertools.count()
        self.id_base = secrets.token_hex(8).encode()
        self.texts = Texts()
        self.log = RequestLog(config.request_log)
        self.limits = Limits(config.model, config.max_model_len, config.max_tokens, config.max_logprobs)
        self.patch_decoder = msgspec.json.Decoder(_FaultPatch)
        card = {
            "id": config.model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "vllm",
            "root": config.model,
            "parent": None,
            "max_model_len": config.max_model_len,
        }
        self.models_body = msgspec.json.encode({"object": "list", "data": [card]})

    # --- plain endpoints ---

    async def health(self, _request: web.Request) -> web.Response:
        return web.Response(status=503 if self.faults.dead else 200)

    async def ping(self, _request: web.Request) -> web.Response:
        return web.Response()

    async def models(self, _request: web.Request) -> web.Response:
        return _json(self.models_body)

    @property
    def pace(self) -> float:
        """Seconds between two tokens; 0: unpaced."""
        return 1.0 / self.faults.tokens_per_s if self.faults.tokens_per_s > 0 else 0.0

    async def get_faults(self, _request: web.Request) -> web.Response:
        return _json(msgspec.json.encode(self.faults))

    async def set_faults(self, request: web.Request) -> web.Response:
        patch = _decode(self.patch_decoder, await request.read())
        if isinstance(patch, web.Response):
            return patch
        for field in patch.__struct_fields__:
            if (value := getattr(patch, field)) is not msgspec.UNSET:
                setattr(self.faults, field, value)
        self.fail_credit = 0.0  # a new fail_rate starts its own sequence
        self._let_in()  # a larger max_num_seqs, or none, lets the line in at once
        return _json(msgspec.json.encode(self.faults))

    async def get_requests(self, _request: web.Request) -> web.Response:
        return _json(self.log.render())

    async def clear_requests(self, _request: web.Request) -> web.Response:
        self.log.clear()
        return web.Response(status=204)

    async def tokenize(self, request: web.Request) -> web.Response:
        try:
            req = tokenize_request(await request.read())
            if req.model is not None and req.model != self.config.model:
                raise unknown_model(req.model)
        except Refusal as refusal:
            return _refused(refusal)
        if req.messages is not None:
            ids = chat_ids(req.messages)
        elif req.prompt is not None:
            ids = prompt_ids(req.prompt)
        else:
            return _bad_request("Either `prompt` or `messages` is required.")
        return _json(
            msgspec.json.encode({"count": len(ids), "max_model_len": self.config.max_model_len, "tokens": ids})
        )

    async def get_metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": _METRICS_TYPE})

    # --- completions ---

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, CHAT, lambda body: chat_plan(chat_request(body), self.limits))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, TEXT, lambda body: completion_plan(completion_request(body), self.limits))

    async def _complete(
        self, request: web.Request, kind: AnswerShape, plan_of: Callable[[bytes], Plan]
    ) -> web.StreamResponse:
        # Every completion request past the API key is logged, refused ones too: tests read what a gateway sent.
        entry = self.log.start(request.path)
        try:
            entry.body = body = await request.read()
            if (refusal := self._admit()) is not None:
                return refusal
            try:
                plan = plan_of(body)
            except Refusal as refused:
                return _refused(refused)
            if self._should_fail():
                return _error(500, "InternalServerError", "Simulated failure.")
            return await self._run(request, kind, plan)
        finally:  # also on cancellation, and after the whole stream was written
            self.log.finish(entry)

    def _admit(self) -> web.Response | None:
        self.completion_requests += 1
        if self.config.crash_after is not None and self.completion_requests > self.config.crash_after:
            os._exit(1)  # a crash, not a shutdown: no cleanup, connections reset
        if self.faults.dead:
            return _error(500, "EngineDeadError", "The engine is dead.")
        return None

    def _should_fail(self) -> bool:
        # Deterministic: the credit grows by fail_rate per request and each whole unit is one failure.
        rate = self.faults.fail_rate
        if rate <= 0.0:
            return False
        self.fail_credit += rate
        if self.fail_credit < 1.0 - 1e-9:
            return False
        self.fail_credit -= 1.0
        return True

    async def _run(self, request: web.Request, kind: AnswerShape, plan: Plan) -> web.StreamResponse:
        if plan.engine_error is not None:  # vLLM's engine refuses it when generation starts
            if not plan.stream:
                return _bad_request(plan.engine_error)
            error = {"error": {"message": plan.engine_error, "type": "BadRequestError", "param": None, "code": 400}}
            events = [b"data: " + msgspec.json.encode(error) + b"\n\n", _DONE]
            return await self._stream(request, events, first=0, end=0, completion=0, start=time.perf_counter())
        start = time.perf_counter()
        async with self._batch_room():
            return await self._generate(request, kind, plan, start)

    @contextlib.asynccontextmanager
    async def _batch_room(self) -> AsyncIterator[None]:
        """A place in the running batch, waited for in line (as vLLM's scheduler queues) while `max_num_seqs`
        requests run; a request that leaves while waiting gives its turn to the next."""
        if self.line or not self._has_room():
            turn = asyncio.get_running_loop().create_future()
            self.line.append(turn)
            self.metrics.waiting += 1
            try:
                await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():  # let in as it left: the place goes to the next
                    self.batch -= 1
                    self._let_in()
                else:
                    self.line.remove(turn)
                raise
            finally:
                self.metrics.waiting -= 1
        else:
            self.batch += 1
        try:
            yield
        finally:
            self.batch -= 1
            self._let_in()

    def _has_room(self) -> bool:
        limit = self.faults.max_num_seqs
        return limit is None or self.batch < limit

    def _let_in(self) -> None:
        """The first in line into the batch while it has room (after a request ends, or a larger limit)."""
        while self.line and self._has_room():
            self.batch += 1
            self.line.popleft().set_result(None)

    async def _generate(self, request: web.Request, kind: AnswerShape, plan: Plan, start: float) -> web.StreamResponse:
        self.metrics.admitted(plan.prompt, plan.completion)
        try:
            if self.faults.hang:
                await self._idle(request)
                return _error(503, "ServiceUnavailableError", "The engine is shutting down.")
            if plan.stream:
                events, first, end = self._events(kind, plan)
                return await self._stream(
                    request, events, first=first, end=end, completion=plan.completion, start=start
                )
            return await self._answer(kind, plan, start=start)
        finally:  # also on cancellation, when the runner cancels handlers of dropped clients
            self.metrics.left(plan.prompt, plan.completion)

    async def _idle(self, request: web.Request) -> None:
        # aiohttp does not cancel a handler whose client left (handler_cancellation is off by default),
        # so a handler that never answers watches its transport, and the app's shutdown, itself.
        # No event exists for "the transport closed", hence the poll.
        while not self.closing and (transport := request.transport) is not None and not transport.is_closing():  # noqa: ASYNC110
            await asyncio.sleep(_POLL_S)

    def _head(self, kind: AnswerShape, object_: bytes) -> bytes:
        rid = b"%s%s%x" % (kind.id_prefix, self.id_base, next(self.ids))
        created = b"%d" % int(time.time())
        return b'{"id":"%s","object":"%s","created":%s,"model":%s,"choices":[' % (
            rid,
            object_,
            created,
            self.model_json,
        )

    async def _answer(self, kind: AnswerShape, plan: Plan, *, start: float) -> web.Response:
        answer = plan.answer
        delay = self.config.ttft_s + (max(len(o.tokens) for o in answer.outputs) - 1) * self.pace
        if delay > 0:
            await asyncio.sleep(delay)
        head = self._head(kind, kind.object_)
        if plan.fast:
            [output] = answer.outputs
            completion = answer.completion_tokens
            text = self.texts.get(completion, plan.json_object)
            choice = finished(kind.answer[0] + text + kind.answer[1], output.finish_reason)
            usage = b'{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}' % (
                answer.prompt_tokens,
                completion,
                answer.prompt_tokens + completion,
            )
            body = head + choice + b'],"usage":' + usage + b"}"
        else:
            body = answer.body(head)
        self.metrics.succeeded(answer.completion_tokens, time.perf_counter() - start, start)
        return _json(body)

    def _events(self, kind: AnswerShape, plan: Plan) -> tuple[list[bytes], int, int]:
        """The stream's events, the index of the first token's, and the index past the last token's."""
        answer = plan.answer
        head = self._head(kind, kind.chunk_object)
        if not plan.fast:
            events, first = answer.events(head)
            end = len(events) - answer.usage_chunk
            return [*events, _DONE], first, end
        head = b"data: " + head
        usage = answer.usage_chunk
        tail = b'],"usage":null}\n\n' if usage else b"]}\n\n"
        events = [head + kind.prelude + tail] if kind.prelude else []
        first = len(events)
        [output] = answer.outputs
        completion = answer.completion_tokens
        events += [head + choice + tail for choice in choices(kind, completion, plan.json_object, output.finish_reason)]
        if usage:
            numbers = (answer.prompt_tokens, completion, answer.prompt_tokens + completion)
            events.append(
                head + b'],"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}}\n\n' % numbers
            )
        events.append(_DONE)
        return events, first, first + completion

    async def _stream(
        self, request: web.Request, events: list[bytes], *, first: int, end: int, completion: int, start: float
    ) -> web.StreamResponse:
        """Sends the events; events[first:end] are the tokens'."""
        stall = self.faults.stall_after_chunks
        stalled = stall is not None and stall < len(events)
        if stall is not None:
            events = events[:stall]
        response = web.StreamResponse(headers=_SSE_HEADERS)
        await response.prepare(request)
        try:
            rest, first_token_at = await self._send(response, events, first, end)
            if stalled:
                await response.write(rest)  # also sends the headers when no event goes out
                await self._idle(request)
                return response
            await response.write_eof(rest)
        except ConnectionError:  # the client left: generation stops here
            return response
        if completion:
            self.metrics.succeeded(completion, first_token_at - start, start)
        return response

    async def _send(
        self, response: web.StreamResponse, events: list[bytes], first: int, end: int
    ) -> tuple[bytes, float]:
        """Writes the events, pacing tokens events[first:end]; returns the unwritten rest and the first token's time."""
        if self.config.ttft_s > 0:
            await asyncio.sleep(self.config.ttft_s)
        first_token_at = time.perf_counter()
        if not self.pace:  # one write for the whole stream: the simulator must never be the bottleneck
            return b"".join(events), first_token_at
        if head := b"".join(events[: first + 1]):
            await response.write(head)
        for event in events[first + 1 : end]:
            await asyncio.sleep(self.pace)
            await response.write(event)
        return b"".join(events[end:]), first_token_at

    async def on_shutdown(self, _app: web.Application) -> None:
        self.closing = True


def _guarded(handler: Handler, api_key: str | None) -> Handler:
    """Like vLLM --api-key: the wrapped route needs `Authorization: Bearer <key>`."""
    if api_key is None:
        return handler
    expected = f"Bearer {api_key}".encode()

    async def guarded(request: web.Request) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode(errors="replace")
        if not hmac.compare_digest(given, expected):
            return _json(_UNAUTHORIZED, 401)
        return await handler(request)

    return guarded


def build_app(config: SimConfig) -> web.Application:
    sim = _Sim(config)
    app = web.Application(client_max_size=_MAX_BODY)
    router = app.router
    router.add_get("/health", sim.health)
    router.add_get("/ping", sim.ping)
    router.add_post("/ping", sim.ping)
    router.add_get("/metrics", sim.get_metrics)
    router.add_post("/tokenize", sim.tokenize)
    router.add_get("/sim/faults", sim.get_faults)
    router.add_post("/sim/faults", sim.set_faults)
    router.add_get("/sim/requests", sim.get_requests)
    router.add_delete("/sim/requests", sim.clear_requests)
    router.add_get("/v1/models", _guarded(sim.models, config.api_key))
    router.add_post("/v1/chat/completions", _guarded(sim.chat, config.api_key))
    router.add_post("/v1/completions", _guarded(sim.completions, config.api_key))
    app.on_shutdown.append(sim.on_shutdown)
    return app


async def serve(config: SimConfig) -> None:
    """Waits startup_delay_s with the port closed, as vLLM does while loading weights, then serves until cancelled."""
    if config.startup_delay_s > 0:
        await asyncio.sleep(config.startup_delay_s)
    runner = web.AppRunner(build_app(config), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, config.host, config.port, backlog=_BACKLOG).start()
        await asyncio.get_running_loop().create_future()
    finally:
        await runner.cleanup()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    if importlib.util.find_spec("uvloop") is None:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = importlib.import_module("uvloop").new_event_loop
    return factory


@click.command("engine-sim", help="Serve a simulated vLLM engine (no GPU) for tests, benchmarks and sandboxes.")
@click.option("--model", required=True, help="Served model name.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--api-key",
    default=None,
    envvar="VLLM_API_KEY",
    help="Require `Authorization: Bearer KEY` on /v1/ routes [VLLM_API_KEY, as vLLM reads it].",
)
@click.option("--startup-delay", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Seconds closed.")
@click.option("--tokens-per-s", type=click.FloatRange(min=0), default=0.0, show_default=True, help="0 = unpaced.")
@click.option("--ttft", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Seconds to first token.")
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Tokens after which the model stops by itself (finish_reason stop) when a request names no length.",
)
@click.option("--max-model-len", type=click.IntRange(min=1), default=4096, show_default=True)
@click.option(
    "--max-logprobs",
    type=click.IntRange(min=-1),
    default=20,
    show_default=True,
    help="Most top logprobs a request may ask for (-1: no limit), as vLLM's.",
)
@click.option("--fail-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True, help="Fraction of 500s.")
@click.option("--hang", is_flag=True, help="Completion requests never answer.")
@click.option("--crash-after", type=click.IntRange(min=0), default=None, help="Exit(1) on the next request.")
@click.option("--stall-after-chunks", type=click.IntRange(min=0), default=None, help="Streams go silent.")
@click.option(
    "--max-num-seqs",
    type=click.IntRange(min=1),
    default=None,
    help="Requests run at once (as vLLM's); the rest wait, counted in vllm:num_requests_waiting. Default: no limit.",
)
@click.option(
    "--request-log",
    type=click.IntRange(min=0),
    default=1000,
    show_default=True,
    help="Requests kept for /sim/requests.",
)
def engine_sim_command(
    *,
    model: str,
    host: str,
    port: int,
    api_key: str | None,
    startup_delay: float,
    tokens_per_s: float,
    ttft: float,
    max_tokens: int,
    max_model_len: int,
    max_logprobs: int,
    fail_rate: float,
    hang: bool,
    crash_after: int | None,
    stall_after_chunks: int | None,
    request_log: int,
    max_num_seqs: int | None,
) -> None:
    config = SimConfig(
        model=model,
        host=host,
        port=port,
        api_key=api_key,
        startup_delay_s=startup_delay,
        tokens_per_s=tokens_per_s,
        ttft_s=ttft,
        max_tokens=max_tokens,
        max_model_len=max_model_len,
        max_logprobs=max_logprobs,
        fail_rate=fail_rate,
        hang=hang,
        crash_after=crash_after,
        stall_after_chunks=stall_after_chunks,
        request_log=request_log,
        max_num_seqs=max_num_seqs,
    )
    click.echo(f"engine-sim: loading {model!r} for {startup_delay}s, then serving on {host}:{port}", err=True)
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(serve(config))
