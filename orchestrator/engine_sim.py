"""vLLM-compatible engine simulator: OpenAI endpoints, /tokenize, /metrics and fault knobs, with no GPU."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hmac
import importlib
import importlib.util
import itertools
import os
import secrets
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Final, TypeVar

import click
import msgspec
from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_T = TypeVar("_T")

_WORDS: Final = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog")
_TEMPLATE_TOKENS: Final = 3  # chat template tokens around each message, and once more for the assistant turn
_TEMPLATE_IDS: Final = (1, 2, 3)
_VOCAB: Final = 32_000
_POLL_S: Final = 0.05  # how often an idle (hung or stalled) handler checks whether its client went away
_KV_CACHE_SEQUENCES: Final = 8  # notional KV cache size, in full-length sequences, behind kv_cache_usage_perc
_MAX_BODY: Final = 64 * 1024 * 1024  # long prompts in benchmarks must not trip aiohttp's 1 MiB default
_BACKLOG: Final = 4096
_TTFT_BUCKETS: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_E2E_BUCKETS: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
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
    max_tokens: int = 16  # completion length when the request gives none
    max_model_len: int = 4096
    fail_rate: float = 0.0  # fraction of completion requests answered 500, deterministically spread
    hang: bool = False  # completion requests never answer (until the client leaves)
    crash_after: int | None = None  # the request after this many completion requests exits the process
    stall_after_chunks: int | None = None  # streams go silent after this many events, connection kept open


class _TextPart(msgspec.Struct):
    text: str | None = None  # image and audio parts carry no text and count for nothing


class _Message(msgspec.Struct):
    content: str | list[_TextPart] | None = None


class _StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


_Prompt = str | list[str | int | list[int]]


class _Sampling(msgspec.Struct):
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool | None = None
    stream_options: _StreamOptions | None = None


class _ChatRequest(_Sampling, kw_only=True):
    messages: list[_Message]


class _CompletionRequest(_Sampling, kw_only=True):
    prompt: _Prompt


class _TokenizeRequest(msgspec.Struct):
    model: str | None = None
    prompt: _Prompt | None = None
    messages: list[_Message] | None = None


_Rate = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
_Count = Annotated[int, msgspec.Meta(ge=0)]


class _Faults(msgspec.Struct):
    fail_rate: _Rate = 0.0
    hang: bool = False
    stall_after_chunks: _Count | None = None
    dead: bool = False


class _FaultPatch(msgspec.Struct, forbid_unknown_fields=True):
    fail_rate: _Rate | msgspec.UnsetType = msgspec.UNSET
    hang: bool | msgspec.UnsetType = msgspec.UNSET
    stall_after_chunks: _Count | msgspec.UnsetType | None = msgspec.UNSET
    dead: bool | msgspec.UnsetType = msgspec.UNSET


@dataclass(frozen=True)
class _Kind:
    """The pre-encoded JSON pieces of one endpoint's answers; a request only adds its id, numbers and text."""

    id_prefix: bytes
    object_: bytes
    chunk_object: bytes
    answer: tuple[bytes, bytes]  # around the JSON text of the non-stream choice
    token: tuple[bytes, ...]  # stream choice per word of _WORDS, finish_reason null
    last: tuple[bytes, ...]  # the same with finish_reason "length"
    prelude: bytes  # choice of the chunk sent before the first token; empty for none


def _word_choices(before: bytes, after: bytes) -> tuple[bytes, ...]:
    return tuple(before + msgspec.json.encode(" " + word) + after for word in _WORDS)


_CHAT: Final = _Kind(
    id_prefix=b"chatcmpl-",
    object_=b"chat.completion",
    chunk_object=b"chat.completion.chunk",
    answer=(b'{"index":0,"message":{"role":"assistant","content":', b'},"logprobs":null,"finish_reason":"length"}'),
    token=_word_choices(b'{"index":0,"delta":{"content":', b'},"logprobs":null,"finish_reason":null}'),
    last=_word_choices(b'{"index":0,"delta":{"content":', b'},"logprobs":null,"finish_reason":"length"}'),
    prelude=b'{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}',
)
_TEXT: Final = _Kind(
    id_prefix=b"cmpl-",
    object_=b"text_completion",
    chunk_object=b"text_completion",
    answer=(b'{"index":0,"text":', b',"logprobs":null,"finish_reason":"length"}'),
    token=_word_choices(b'{"index":0,"text":', b',"logprobs":null,"finish_reason":null}'),
    last=_word_choices(b'{"index":0,"text":', b',"logprobs":null,"finish_reason":"length"}'),
    prelude=b"",
)


def _content_words(content: str | list[_TextPart] | None) -> list[str]:
    if isinstance(content, str):
        return content.split()
    if content is None:
        return []
    return [word for part in content if part.text for word in part.text.split()]


def _chat_tokens(messages: list[_Message]) -> int:
    return sum(len(_content_words(m.content)) + _TEMPLATE_TOKENS for m in messages) + _TEMPLATE_TOKENS


def _prompt_tokens(prompt: _Prompt) -> int:
    if isinstance(prompt, str):
        return len(prompt.split())
    return sum(
        len(item.split()) if isinstance(item, str) else 1 if isinstance(item, int) else len(item) for item in prompt
    )


def _word_id(word: str) -> int:
    return zlib.crc32(word.encode()) % _VOCAB


def _chat_ids(messages: list[_Message]) -> list[int]:
    ids: list[int] = []
    for message in messages:
        ids += _TEMPLATE_IDS
        ids += (_word_id(word) for word in _content_words(message.content))
    return ids + list(_TEMPLATE_IDS)


def _prompt_ids(prompt: _Prompt) -> list[int]:
    ids: list[int] = []
    for item in [prompt] if isinstance(prompt, str) else prompt:
        if isinstance(item, str):
            ids += (_word_id(word) for word in item.split())
        elif isinstance(item, int):
            ids.append(item)
        else:
            ids += item
    return ids


def _json(body: bytes, status: int = 200) -> web.Response:
    return web.Response(status=status, body=body, content_type=_JSON)


def _error(status: int, kind: str, message: str) -> web.Response:
    error = {"message": message, "type": kind, "param": None, "code": status}
    return _json(msgspec.json.encode({"error": error}), status)


def _bad_request(message: str) -> web.Response:
    return _error(400, "BadRequestError", message)


def _decode(decoder: msgspec.json.Decoder[_T], body: bytes) -> _T | web.Response:
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as exc:  # malformed JSON and schema violations alike
        return _bad_request(str(exc))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Histogram:
    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # le is inclusive
        self.sum += value
        self.count += 1

    def render(self, name: str, help_: str, labels: str) -> list[str]:
        lines = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        cumulative = itertools.accumulate(self.counts[:-1])
        lines += (f'{name}_bucket{{{labels},le="{b}"}} {n}' for b, n in zip(self.bounds, cumulative, strict=True))
        lines += [
            f'{name}_bucket{{{labels},le="+Inf"}} {self.count}',
            f"{name}_sum{{{labels}}} {self.sum}",
            f"{name}_count{{{labels}}} {self.count}",
        ]
        return lines


class _Sim:
    """One simulated engine: its knobs, its counters and the request handlers."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.faults = _Faults(config.fail_rate, config.hang, config.stall_after_chunks)
        self.pace = 1.0 / config.tokens_per_s if config.tokens_per_s > 0 else 0.0
        self.model_json = msgspec.json.encode(config.model)
        self.label = f'model_name="{_escape_label(config.model)}"'
        self.closing = False
        self.completion_requests = 0
        self.fail_credit = 0.0
        self.running = 0
        self.running_tokens = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.success_total = 0
        self.ttft = _Histogram(_TTFT_BUCKETS)
        self.e2e = _Histogram(_E2E_BUCKETS)
        self.ids = itertools.count()
        self.id_base = secrets.token_hex(8).encode()
        self.texts: dict[int, bytes] = {}
        self.chat_decoder = msgspec.json.Decoder(_ChatRequest)
        self.text_decoder = msgspec.json.Decoder(_CompletionRequest)
        self.tokenize_decoder = msgspec.json.Decoder(_TokenizeRequest)
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
        return _json(msgspec.json.encode(self.faults))

    async def tokenize(self, request: web.Request) -> web.Response:
        req = _decode(self.tokenize_decoder, await request.read())
        if isinstance(req, web.Response):
            return req
        if req.model is not None and req.model != self.config.model:
            return self._unknown_model(req.model)
        if req.messages is not None:
            ids = _chat_ids(req.messages)
        elif req.prompt is not None:
            ids = _prompt_ids(req.prompt)
        else:
            return _bad_request("Either `prompt` or `messages` is required.")
        return _json(
            msgspec.json.encode({"count": len(ids), "max_model_len": self.config.max_model_len, "tokens": ids})
        )

    async def metrics(self, _request: web.Request) -> web.Response:
        labels = self.label
        kv_usage = min(1.0, self.running_tokens / (self.config.max_model_len * _KV_CACHE_SEQUENCES))
        lines: list[str] = []
        for kind, name, help_, value in (
            ("gauge", "vllm:num_requests_running", "Requests in model execution batches.", self.running),
            ("gauge", "vllm:num_requests_waiting", "Requests waiting to be processed.", 0),
            ("gauge", "vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.", kv_usage),
            ("counter", "vllm:prompt_tokens_total", "Prefill tokens processed.", self.prompt_tokens_total),
            ("counter", "vllm:generation_tokens_total", "Generation tokens processed.", self.generation_tokens_total),
        ):
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name}{{{labels}}} {float(value)}"]
        name = "vllm:request_success_total"
        lines += [
            f"# HELP {name} Successfully processed requests.",
            f"# TYPE {name} counter",
            f'{name}{{finished_reason="length",{labels}}} {float(self.success_total)}',
        ]
        lines += self.ttft.render("vllm:time_to_first_token_seconds", "Time to first token.", labels)
        lines += self.e2e.render("vllm:e2e_request_latency_seconds", "End to end request latency.", labels)
        body = ("\n".join(lines) + "\n").encode()
        return web.Response(body=body, headers={"Content-Type": _METRICS_TYPE})

    # --- completions ---

    async def chat(self, request: web.Request) -> web.StreamResponse:
        if (refusal := self._admit()) is not None:
            return refusal
        req = _decode(self.chat_decoder, await request.read())
        if isinstance(req, web.Response):
            return req
        return await self._run(request, _CHAT, req, _chat_tokens(req.messages))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        if (refusal := self._admit()) is not None:
            return refusal
        req = _decode(self.text_decoder, await request.read())
        if isinstance(req, web.Response):
            return req
        return await self._run(request, _TEXT, req, _prompt_tokens(req.prompt))

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

    def _unknown_model(self, model: str) -> web.Response:
        return _error(404, "NotFoundError", f"The model `{model}` does not exist.")

    def _check(self, req: _Sampling, prompt: int, completion: int) -> web.Response | None:
        if req.model is not None and req.model != self.config.model:
            return self._unknown_model(req.model)
        if completion < 1:
            return _bad_request(f"max_tokens must be at least 1, got {completion}.")
        limit = self.config.max_model_len
        if prompt + completion > limit:
            return _bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt + completion} tokens ({prompt} in the messages, {completion} in the completion)."
            )
        if self._should_fail():
            return _error(500, "InternalServerError", "Simulated failure.")
        return None

    async def _run(self, request: web.Request, kind: _Kind, req: _Sampling, prompt: int) -> web.StreamResponse:
        completion = req.max_completion_tokens
        if completion is None:
            completion = self.config.max_tokens if req.max_tokens is None else req.max_tokens
        if (refusal := self._check(req, prompt, completion)) is not None:
            return refusal
        start = time.perf_counter()
        # Prompt tokens count once admitted (prefilled, for vLLM); generation tokens only for finished requests.
        self.running += 1
        self.running_tokens += prompt + completion
        self.prompt_tokens_total += prompt
        try:
            if self.faults.hang:
                await self._idle(request)
                return _error(503, "ServiceUnavailableError", "The engine is shutting down.")
            if req.stream:
                usage = req.stream_options is not None and bool(req.stream_options.include_usage)
                return await self._stream(request, kind, prompt=prompt, completion=completion, usage=usage, start=start)
            return await self._answer(kind, prompt, completion, start)
        finally:  # also on cancellation, when the runner cancels handlers of dropped clients
            self.running -= 1
            self.running_tokens -= prompt + completion

    async def _idle(self, request: web.Request) -> None:
        # aiohttp does not cancel a handler whose client left (handler_cancellation is off by default),
        # so a handler that never answers watches its transport, and the app's shutdown, itself.
        # No event exists for "the transport closed", hence the poll.
        while not self.closing and (transport := request.transport) is not None and not transport.is_closing():  # noqa: ASYNC110
            await asyncio.sleep(_POLL_S)

    def _text(self, completion: int) -> bytes:
        text = self.texts.get(completion)
        if text is None:
            words = "".join(" " + _WORDS[i % len(_WORDS)] for i in range(completion))
            text = self.texts[completion] = msgspec.json.encode(words)
        return text

    def _head(self, kind: _Kind, object_: bytes) -> bytes:
        rid = b"%s%s%x" % (kind.id_prefix, self.id_base, next(self.ids))
        created = b"%d" % int(time.time())
        return b'{"id":"%s","object":"%s","created":%s,"model":%s,"choices":[' % (
            rid,
            object_,
            created,
            self.model_json,
        )

    def _succeeded(self, completion: int, ttft: float, start: float) -> None:
        self.generation_tokens_total += completion
        self.success_total += 1
        self.ttft.observe(ttft)
        self.e2e.observe(time.perf_counter() - start)

    async def _answer(self, kind: _Kind, prompt: int, completion: int, start: float) -> web.Response:
        delay = self.config.ttft_s + (completion - 1) * self.pace
        if delay > 0:
            await asyncio.sleep(delay)
        usage = b'{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}' % (
            prompt,
            completion,
            prompt + completion,
        )
        answer = kind.answer[0] + self._text(completion) + kind.answer[1]
        body = self._head(kind, kind.object_) + answer + b'],"usage":' + usage + b"}"
        elapsed = time.perf_counter() - start
        self._succeeded(completion, elapsed, start)
        return _json(body)

    def _events(self, kind: _Kind, prompt: int, completion: int, usage: bool) -> list[bytes]:
        head = b"data: " + self._head(kind, kind.chunk_object)
        tail = b'],"usage":null}\n\n' if usage else b"]}\n\n"
        events = [head + kind.prelude + tail] if kind.prelude else []
        words = len(_WORDS)
        events += (head + kind.token[i % words] + tail for i in range(completion - 1))
        events.append(head + kind.last[(completion - 1) % words] + tail)
        if usage:
            numbers = (prompt, completion, prompt + completion)
            events.append(
                head + b'],"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}}\n\n' % numbers
            )
        events.append(_DONE)
        return events

    async def _stream(
        self, request: web.Request, kind: _Kind, *, prompt: int, completion: int, usage: bool, start: float
    ) -> web.StreamResponse:
        events = self._events(kind, prompt, completion, usage)
        stall = self.faults.stall_after_chunks
        stalled = stall is not None and stall < len(events)
        if stall is not None:
            events = events[:stall]
        response = web.StreamResponse(headers=_SSE_HEADERS)
        await response.prepare(request)
        first = 1 if kind.prelude else 0  # index of the first token's event
        try:
            rest, first_token_at = await self._send(response, events, first, first + completion)
            if stalled:
                await response.write(rest)  # also sends the headers when no event goes out
                await self._idle(request)
                return response
            await response.write_eof(rest)
        except ConnectionError:  # the client left: generation stops here
            return response
        self._succeeded(completion, first_token_at - start, start)
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
    router.add_get("/metrics", sim.metrics)
    router.add_post("/tokenize", sim.tokenize)
    router.add_get("/sim/faults", sim.get_faults)
    router.add_post("/sim/faults", sim.set_faults)
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
@click.option("--max-tokens", type=click.IntRange(min=1), default=16, show_default=True, help="Default length.")
@click.option("--max-model-len", type=click.IntRange(min=1), default=4096, show_default=True)
@click.option("--fail-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True, help="Fraction of 500s.")
@click.option("--hang", is_flag=True, help="Completion requests never answer.")
@click.option("--crash-after", type=click.IntRange(min=0), default=None, help="Exit(1) on the next request.")
@click.option("--stall-after-chunks", type=click.IntRange(min=0), default=None, help="Streams go silent.")
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
    fail_rate: float,
    hang: bool,
    crash_after: int | None,
    stall_after_chunks: int | None,
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
        fail_rate=fail_rate,
        hang=hang,
        crash_after=crash_after,
        stall_after_chunks=stall_after_chunks,
    )
    click.echo(f"engine-sim: loading {model!r} for {startup_delay}s, then serving on {host}:{port}", err=True)
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(serve(config))


if __name__ == "__main__":
    engine_sim_command()
