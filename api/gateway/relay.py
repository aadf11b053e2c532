"""Relaying a replica's answer to the client: bytes through as they come, usage read on the way.

A watcher on `receive` cancels the relay when the client goes away, which closes the upstream connection,
which makes vLLM abort the generation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aiohttp
import msgspec
from litestar.types import Receive, Send

from orchestrator.billing.records import CallKind, relayed_tokens
from orchestrator.gateway.flow import USAGE_DECODER, Call, Outcome, UpstreamFailed, Usage, counted_prompt, usage_of
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
            if outcome.usage is None and isinstance(outcome.answer, list) and outcome.first_byte is not None:
                completion = relayed_tokens(outcome.answer)  # a token per relayed event with text
                outcome.usage = Usage(0, completion, completion)  # kept if the count of the prompt is cut short
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
    except (aiohttp.ClientError, TimeoutError) as e:  # nothing was sent yet: the caller answers 502
        raise UpstreamFailed(f"the replica broke off its answer: {type(e).__name__}") from e
    status = outcome.status = response.status
    outcome.usage = usage_of(payload) if status == 200 else None
    outcome.answer = payload
    content_type = response.headers.get("Content-Type", "application/json").encode()
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


async def relay_stream(
    call: Call,
    send: Send,
    outcome: Outcome,
    commit: Commit,
    *,
    keep_usage_chunk: bool,
    extra: tuple[tuple[bytes, bytes], ...] = (),
) -> int:
    """Relay the replica's events as they come, filling `outcome` on the way (so a relay cut short by the client
    leaves what it relayed); the `[DONE]` event and the end of the stream wait for `commit`."""
    response = call.response
    if response.status != 200:  # an error answers as one JSON document, not a stream
        return await relay_whole(call, send, outcome, commit, extra=extra)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), *extra],
        }
    )
    outcome.status = 200
    reader, tail = EventReader(), b""
    sent: list[bytes] = []  # kept for the call's record, which reads the completion's text off the hot path
    outcome.answer = sent
    try:
        async for chunk in response.content.iter_any():
            out = reader.feed(chunk)
            if not out:
                continue
            if b'"usage":{' in out:  # only the final chunk carries usage; find it without parsing the rest
                out, outcome.usage = _take_usage(out, keep_usage_chunk)
            if DONE_EVENT in out:  # the stream's end is held back until the call is accounted for
                at = out.index(DONE_EVENT)
                out, tail = out[:at], out[at:]
            if out:
                if outcome.first_byte is None:
                    outcome.first_byte = time.perf_counter()
                sent.append(out)
                await send({"type": "http.response.body", "body": out, "more_body": True})
    except (aiohttp.ClientError, TimeoutError):
        outcome.status, reader.rest, tail = 502, b"", b""  # the replica broke off mid-stream: end ours cleanly
    await commit()
    await send({"type": "http.response.body", "body": tail + reader.rest, "more_body": False})
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
