"""Relaying a replica's answer to the client: bytes through as they come, usage read on the way.

A watcher on `receive` cancels the relay when the client goes away, which closes the upstream connection,
which makes vLLM abort the generation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import msgspec
from litestar.types import Receive, Send

from orchestrator.billing.records import CallKind, refused_in_stream, relayed_tokens
from orchestrator.gateway.flow import USAGE_DECODER, Call, Outcome, UpstreamFailed, Usage, counted_prompt, usage_of
from orchestrator.gateway.http1 import BrokenOff
from orchestrator.platform import sse
from orchestrator.platform.sse import DONE_EVENT, EventReader

CLIENT_CLOSED = 499  # nginx's code for a request the client abandoned; recorded in usage, never sent
WATCH_AFTER_S = 0.05
"""Requests still running after this get a disconnect watcher; a task for every short call costs ~10% of
the gateway's throughput, and a call abandoned within 50 ms wastes little engine time."""


async def until_disconnected(relay: Callable[[], Awaitable[int]], receive: Receive) -> int:
    """Run `relay`; if the client disconnects first, cancel it and report CLIENT_CLOSED."""
    task = asyncio.current_task()
    assert task is not None
    gone = False

    watcher: asyncio.Task[None] | None = None

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    def start_watching() -> None:
        nonlocal watcher
        watcher = loop.create_task(watch())

    loop = asyncio.get_running_loop()
    timer = loop.call_later(WATCH_AFTER_S, start_watching)
    try:
        return await relay()
    except asyncio.CancelledError:
        if not gone:
            raise
        task.uncancel()
        return CLIENT_CLOSED
    finally:
        timer.cancel()
        if watcher is not None:
            watcher.cancel()


Commit = Callable[[], Awaitable[None]]
"""Accounts for the call (fee and record) and returns once that is durable: called before the answer's last byte."""


class Settlement:
    """A relayed call's `Commit`: accounts for it once, however its relay ends (before the last byte, or after the
    client left or the replica broke off), and waits until its record is on disk.

    `finish` charges the call from `outcome` and returns the journal's future; when the engine's usage never came,
    the usage is first counted from what was relayed."""

    __slots__ = ("_done", "_finish", "_kind", "_request", "outcome")

    def __init__(
        self, kind: CallKind, request: bytes, finish: Callable[[Outcome], asyncio.Future[None] | None]
    ) -> None:
        self.outcome = Outcome(500)
        self._kind, self._request, self._finish = kind, request, finish
        self._done = False

    async def __call__(self) -> None:
        if self._done:
            return
        self._done = True
        outcome = self.outcome
        try:
            answer = outcome.answer
            if outcome.usage is None and isinstance(answer, list) and outcome.first_byte is not None:
                completion = relayed_tokens(answer)  # a token per relayed event with text
                outcome.usage = Usage(0, completion, completion)  # kept if the count of the prompt is cut short
                if completion or not refused_in_stream(answer):  # an engine's refusal costs nothing
                    prompt = await counted_prompt(self._kind, self._request)
                    outcome.usage = Usage(prompt, completion, prompt + completion)
        finally:  # even cancelled, the call gives its slot back and is charged
            durable = self._finish(outcome)
        if durable is not None:
            await durable


async def relay_whole(
    call: Call, send: Send, outcome: Outcome, commit: Commit, *, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> int:
    """Read the replica's whole answer, account for it, then send it; returns the status."""
    response = call.response
    try:
        payload = await response.read()
    except (BrokenOff, TimeoutError) as e:  # nothing was sent yet: the caller answers 502
        raise UpstreamFailed(f"the replica broke off its answer: {type(e).__name__}") from e
    status = outcome.status = response.status
    outcome.usage = usage_of(payload) if status == 200 else None
    outcome.answer = payload
    content_type = response.header(b"content-type") or b"application/json"
    outcome.first_byte = time.perf_counter()
    await commit()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), (b"content-length", str(len(payload)).encode()), *extra],
        }
    )
    await send({"type": "http.response.body", "body": payload, "more_body": False})
    return status


class OpenAIStream:
    """The engine's events as they came (OpenAI's SSE); the usage-only chunk only for a client that asked for it.
    `[DONE]` is held back until the call is accounted for."""

    content_type = b"text/event-stream"

    __slots__ = ("_keep_usage", "_tail")

    def __init__(self, *, keep_usage_chunk: bool) -> None:
        self._keep_usage, self._tail = keep_usage_chunk, b""

    def frame(self, block: bytes, outcome: Outcome) -> tuple[bytes, bytes]:
        """(what the client gets, what the record keeps) of a block of whole events; the usage goes to `outcome`."""
        if b'"usage":{' in block:  # only the final chunk carries usage; find it without parsing the rest
            block, outcome.usage = _take_usage(block, self._keep_usage)
        if DONE_EVENT in block:
            at = block.index(DONE_EVENT)
            block, self._tail = block[:at], block[at:]
        return block, block

    def end(self, rest: bytes) -> bytes:
        """The stream's last bytes, once the call is accounted for (`rest`: what followed the last whole event)."""
        return self._tail + rest


class ToolkitStream:
    """The toolkit's stream: only the events with choices (no usage-only chunk, no `[DONE]`), each as an SSE event
    (`raw_stream_response` true) or as its bare JSON on a line of its own (false)."""

    content_type = b"text/event-stream; charset=utf-8"  # what the toolkit's Flask answers a stream with

    __slots__ = ("_raw",)

    def __init__(self, *, raw_stream_response: bool) -> None:
        self._raw = raw_stream_response

    def frame(self, block: bytes, outcome: Outcome) -> tuple[bytes, bytes]:
        client, record = bytearray(), bytearray()
        for event in sse.events(block):
            doc = sse.document(event)
            if doc is None:  # [DONE], comments
                continue
            try:
                parsed = _EVENT.decode(doc)
            except (msgspec.DecodeError, UnicodeDecodeError):
                continue
            if parsed.usage is not None:
                outcome.usage = parsed.usage
            if not parsed.choices:
                continue
            record += event + sse.EVENT_END  # the record reads SSE events
            client += (event + sse.EVENT_END) if self._raw else (doc + b"\n")
        return bytes(client), bytes(record)

    def end(self, rest: bytes) -> bytes:
        return b""  # no [DONE]; an unfinished event is no document


class _Event(msgspec.Struct):
    choices: list[msgspec.Raw] | None = None
    usage: Usage | None = None


_EVENT = msgspec.json.Decoder(_Event)
StreamShape = OpenAIStream | ToolkitStream


async def relay_stream(
    call: Call,
    send: Send,
    outcome: Outcome,
    commit: Commit,
    *,
    shape: StreamShape,
    extra: tuple[tuple[bytes, bytes], ...] = (),
) -> int:
    """Relay the replica's events as they come, in `shape`, filling `outcome` on the way (so a relay cut short by
    the client leaves what it relayed); the end of the stream waits for `commit`."""
    response = call.response
    if response.status != 200:  # an error answers as one JSON document, not a stream
        return await relay_whole(call, send, outcome, commit, extra=extra)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", shape.content_type), (b"cache-control", b"no-cache"), *extra],
        }
    )
    outcome.status = 200
    reader = EventReader()
    sent: list[bytes] = []  # kept for the call's record, which reads the completion's text off the hot path
    outcome.answer = sent
    broken = False
    try:
        async for chunk in response.chunks():
            block = reader.feed(chunk)
            if not block:
                continue
            out, record = shape.frame(block, outcome)
            if record:
                sent.append(record)
            if out:
                if outcome.first_byte is None:
                    outcome.first_byte = time.perf_counter()
                await send({"type": "http.response.body", "body": out, "more_body": True})
    except (BrokenOff, TimeoutError):
        outcome.status, broken = 502, True  # the replica broke off mid-stream: end ours cleanly
    await commit()
    await send({"type": "http.response.body", "body": b"" if broken else shape.end(reader.rest), "more_body": False})
    return outcome.status


def _take_usage(block: bytes, keep: bool) -> tuple[bytes, Usage | None]:
    kept: list[bytes] = []
    usage: Usage | None = None
    for event in sse.events(block):
        doc = sse.document(event) if b'"usage":{' in event else None
        if doc is not None:
            try:
                parsed = USAGE_DECODER.decode(doc)
            except msgspec.DecodeError:  # not ours to judge: pass the event through untouched
                parsed = None
            if parsed is not None and parsed.usage is not None:
                usage = parsed.usage
                if not keep and not parsed.choices:
                    continue  # the usage-only chunk the client did not ask for
        kept.append(event + b"\n\n")
    return b"".join(kept), usage
