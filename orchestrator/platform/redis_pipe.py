"""The event loop's own connection to Redis, never blocking it: the commands of every call in one turn of the loop
go out in one write, and their answers are read in order as they arrive, while the loop serves other calls.

A call's check that waits for its answer costs it a round trip but costs the loop nothing; concurrent calls share
round trips. A write whose answer nobody reads (`send`) goes out with the next turn's batch, and a caller may add its
own last commands to that batch (`before_write`: changes summed over the turn go as one).

Errors: `PipeBroken` when the connection fails, closes or an answer takes longer than the timeout (every command
waiting on it fails with it, and the next command connects again). An error Redis answers (a script's) is returned,
as a `hiredis.ReplyError`, not raised.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable
from typing import Any

import hiredis


class PipeBroken(Exception):
    """The connection to Redis failed; the commands waiting on it have no answer."""


_DISCARD = None
"""In the queue of answers awaited, the place of a command sent with `send` (its answer is dropped)."""

_Awaited = asyncio.Future[Any] | bytes | None
"""A command's place in the queue of answers awaited: its caller's future, `_DISCARD`, or (for a script sent by SHA
with `send`) the whole script's command, sent instead if Redis answers that it does not know the SHA."""


class RedisPipe:
    """Commands to one Redis, pipelined on the running event loop (one connection per loop)."""

    def __init__(
        self, connect: dict[str, Any], *, timeout_s: float, on_broken: Callable[[], None] | None = None
    ) -> None:
        self._connect_kwargs = connect
        """redis-py's connection arguments: `path` (a unix socket) or `host`/`port`; `db`, `username`, `password`."""
        self._timeout_s = timeout_s
        self._on_broken = on_broken
        """Told when the connection fails: what was written on it may or may not have run (or may run later)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self._out: list[bytes] = []
        """Packed commands waiting for this turn's write."""
        self._writing = False
        self._before: list[Callable[[], None]] = []
        """Called just before this turn's write (each once), to add their commands to it."""
        self._awaited: collections.deque[_Awaited] = collections.deque()
        """One place per command written or to be written, in order."""
        self._abandoned: dict[asyncio.Future[Any], Callable[[Any], None]] = {}
        """What to do with the answer of a command whose caller was cancelled, by the caller's (cancelled) future."""
        self._written = 0
        self._answered = 0
        """Commands written and answers read on this connection: a write whose answers are not all read within the
        timeout breaks it (one timer per write, not per command)."""

    async def call(self, *command: str | int | float | bytes, abandoned: Callable[[Any], None] | None = None) -> Any:
        """The answer to `command` (an error Redis answers is returned, not raised). A caller cancelled before the
        answer came does not stop the command: `abandoned` is then given its answer, to undo what it did."""
        loop = self._ensure_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue(pack(command), future)
        try:
            return await future
        except asyncio.CancelledError:
            if abandoned is not None and future.cancelled():
                self._abandoned[future] = abandoned
            raise

    def send(self, *command: str | int | float | bytes, fallback: tuple[str | int | float | bytes, ...] = ()) -> None:
        """Send `command` with this turn's batch; its answer is not read by anyone (a lost one is lost). `fallback`:
        sent instead when Redis answers NOSCRIPT (an EVALSHA's whole script, to a Redis restarted meanwhile)."""
        self._ensure_loop()
        self._queue(pack(command), pack(fallback) if fallback else _DISCARD)

    def before_write(self, callback: Callable[[], None]) -> None:
        """Call `callback` (once, however often it is asked for) just before this turn's batch is written: what it
        sends goes in that write."""
        self._ensure_loop()
        if callback not in self._before:
            self._before.append(callback)
        self._schedule()

    def close(self) -> None:
        self._broken(PipeBroken("closed"))

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new loop (a test's, a forked worker's): nothing of the old one is usable
            self._drop()
            self._loop, self._out, self._awaited, self._writing = loop, [], collections.deque(), False
            self._before = []
        return loop

    def _queue(self, packed: bytes, awaited: _Awaited) -> None:
        self._out.append(packed)
        self._awaited.append(awaited)
        self._schedule()

    def _schedule(self) -> None:
        if not self._writing:
            self._writing = True
            assert self._loop is not None
            if self._writer is not None:  # the next turn writes what this turn's calls add, in one write
                self._loop.call_soon(self._flush)
            else:
                self._loop.create_task(self._connect_then_flush())

    async def _connect_then_flush(self) -> None:
        try:
            await self._open()
        except (OSError, PipeBroken, TimeoutError) as e:
            self._writing = False
            self._broken(_as_broken(e))
            return
        self._flush()

    def _flush(self) -> None:
        before, self._before = self._before, []
        for callback in before:  # still writing: what they send joins this write
            callback()
        self._writing = False
        writer = self._writer
        if writer is None or not self._out:  # broken meanwhile: its commands have failed already
            return
        out, self._out = self._out, []
        try:
            writer.write(b"".join(out))
        except (OSError, RuntimeError) as e:  # a transport closing under it
            self._broken(_as_broken(e))
            return
        self._written += len(out)
        assert self._loop is not None
        self._loop.call_later(self._timeout_s, self._deadline, writer, self._written)

    async def _open(self) -> None:
        async with asyncio.timeout(self._timeout_s):
            reader, writer = await open_connection(self._connect_kwargs)
        # The session's own commands go first, their answers dropped in place (an error there shows in the next).
        hello = session_commands(self._connect_kwargs)
        for _ in hello:
            self._awaited.appendleft(_DISCARD)
        self._out[:0] = hello
        self._writer = writer
        self._reading = asyncio.get_running_loop().create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        parser = hiredis.Reader()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    raise PipeBroken("Redis closed the connection")
                parser.feed(data)
                while (answer := parser.gets()) is not False:
                    future = self._awaited.popleft()
                    self._answered += 1
                    if isinstance(future, bytes):
                        if isinstance(answer, hiredis.ReplyError) and str(answer).startswith("NOSCRIPT"):
                            self._queue(future, _DISCARD)
                    elif future is not None and not future.done():
                        future.set_result(answer)
                    elif future is not None and (undo := self._abandoned.pop(future, None)) is not None:
                        undo(answer)
        except (OSError, PipeBroken, IndexError, hiredis.ProtocolError) as e:
            self._broken(_as_broken(e))

    def _deadline(self, writer: asyncio.StreamWriter, written: int) -> None:
        if writer is self._writer and self._answered < written:
            self._broken(PipeBroken(f"no answer from Redis in {self._timeout_s} s"))

    def _broken(self, error: PipeBroken) -> None:
        """Every command waiting fails with `error`; the next one connects again."""
        self._drop()
        awaited, self._awaited = self._awaited, collections.deque()
        self._abandoned.clear()  # their commands' fate is unknown, as every waiting caller's is
        for future in awaited:
            if isinstance(future, asyncio.Future) and not future.done():
                future.set_exception(error)
        self._out = []
        if self._on_broken is not None:
            self._on_broken()

    def _drop(self) -> None:
        if self._reading is not None and self._reading is not _current_task():
            with contextlib.suppress(RuntimeError):  # its loop already closed: nothing of it runs again
                self._reading.cancel()
        self._reading = None
        if self._writer is not None:
            with contextlib.suppress(Exception):  # a transport of a loop already closed
                self._writer.close()
        self._writer = None
        self._written = self._answered = 0


def connection_args(url: str) -> dict[str, Any]:
    """What a connection of ours needs of a `redis://` or `unix://` URL (parsed as redis-py does): `path` (a unix
    socket) or `host`/`port`; `db`, `username`, `password`."""
    from redis.connection import parse_url  # noqa: PLC0415 (redis-py's imports, paid only by an instance using Redis)

    parsed: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
    return {k: parsed[k] for k in ("path", "host", "port", "db", "username", "password") if parsed.get(k)}


async def open_connection(args: dict[str, Any]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if args.get("path"):
        return await asyncio.open_unix_connection(args["path"])
    return await asyncio.open_connection(args.get("host", "localhost"), args.get("port", 6379))


def session_commands(args: dict[str, Any], *, select: bool = True) -> list[bytes]:
    """The commands a new connection sends first, packed: AUTH, and SELECT of its database (`select`)."""
    hello: list[bytes] = []
    if args.get("password"):
        auth = (args["username"], args["password"]) if args.get("username") else (args["password"],)
        hello.append(pack(("AUTH", *auth)))
    if select and args.get("db"):
        hello.append(pack(("SELECT", args["db"])))
    return hello


def _as_broken(e: Exception) -> PipeBroken:
    return e if isinstance(e, PipeBroken) else PipeBroken(f"{type(e).__name__}: {e}")


def pack(command: tuple[Any, ...]) -> bytes:
    # A tuple of any length (hiredis's stubs say a 1-tuple).
    packed: bytes = hiredis.pack_command(command)
    return packed


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None
