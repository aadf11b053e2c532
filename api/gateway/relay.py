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

from orchestrator.gateway import USAGE_DECODER, Call, Outcome, UpstreamFailed, Usage, usage_of

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


async def relay_whole(call: Call, send: Send, *, extra: tuple[tuple[bytes, bytes], ...] = ()) -> Outcome:
    response = call.response
    try:
        payload = await response.read()
    except (aiohttp.ClientError, TimeoutError) as e:  # nothing was sent yet: the caller answers 502
        raise UpstreamFailed(f"the replica broke off its answer: {type(e).__name__}") from e
    status = response.status
    content_type = response.headers.get("Content-Type", "application/json").encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), (b"content-length", str(len(payload)).encode()), *extra],
        }
    )
    first_byte = time.perf_counter()
    await send({"type": "http.response.body", "body": payload, "more_body": False})
    return Outcome(status, usage_of(payload) if status == 200 else None, payload, first_byte)


async def relay_stream(
    call: Call, send: Send, *, keep_usage_chunk: bool, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> Outcome:
    response = call.response
    if response.status != 200:  # an error answers as one JSON document, not a stream
        return await relay_whole(call, send, extra=extra)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), *extra],
        }
    )
    usage: Usage | None = None
    pending = b""
    status = 200
    sent: list[bytes] = []  # kept for the call's record, which reads the completion's text off the hot path
    first_byte: float | None = None
    try:
        async for chunk in response.content.iter_any():
            pending += chunk
            if b"\n\n" not in pending:
                continue
            complete, _, pending = pending.rpartition(b"\n\n")
            out = complete + b"\n\n"
            if b'"usage":{' in complete:  # only the final chunk carries usage; find it without parsing the rest
                out, usage = _take_usage(complete, keep_usage_chunk)
            if out:
                if first_byte is None:
                    first_byte = time.perf_counter()
                sent.append(out)
                await send({"type": "http.response.body", "body": out, "more_body": True})
    except (aiohttp.ClientError, TimeoutError):
        status, pending = 502, b""  # the replica broke off mid-stream: end ours cleanly, without [DONE]
    await send({"type": "http.response.body", "body": pending, "more_body": False})
    return Outcome(status, usage, sent, first_byte)


def _take_usage(events: bytes, keep: bool) -> tuple[bytes, Usage | None]:
    kept: list[bytes] = []
    usage: Usage | None = None
    for event in events.split(b"\n\n"):
        if b'"usage":{' in event and event.startswith(b"data: {"):
            try:
                parsed = USAGE_DECODER.decode(event[6:])
            except msgspec.DecodeError:  # not ours to judge: pass the event through untouched
                parsed = None
            if parsed is not None and parsed.usage is not None:
                usage = parsed.usage
                if not keep and not parsed.choices:
                    continue  # the usage-only chunk the client did not ask for
        kept.append(event + b"\n\n")
    return b"".join(kept), usage
