"""A Redis pub/sub channel: messages published to it reach every connection subscribed to it at that moment, and
no one else (Redis keeps nothing for a subscriber that is away). The change feed between the processes of one
machine on SQLite (`--workers N`, which needs Redis anyway) goes over one.

Publishing goes over the event loop's pipe. Listening holds a connection of its own, in subscribed mode; a quiet one
is asked every `check_every_s` whether it still works (a PING, answered in that mode too), so that a peer gone
silently is noticed. Every failure to reach Redis is a `ConnectionError`, saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import hiredis

from orchestrator.platform.redis_pipe import (
    PipeBroken,
    RedisPipe,
    connection_args,
    open_connection,
    pack,
    session_commands,
)


class RedisChannel:
    """One channel named `name` on the Redis at `url`. Its listening connections carry the same name (`CLIENT LIST`
    shows them)."""

    def __init__(self, url: str, name: str, *, timeout_s: float, check_every_s: float) -> None:
        self.name = name
        self._args = connection_args(url)
        self._timeout_s = timeout_s
        self._check_every_s = check_every_s
        self._pipe = RedisPipe(self._args, timeout_s=timeout_s)

    async def publish(self, payload: str) -> int:
        """Sends `payload` to every subscriber now listening; answers how many there were."""
        try:
            answer = await self._pipe.call("PUBLISH", self.name, payload)
        except PipeBroken as e:
            raise ConnectionError(str(e)) from e
        if isinstance(answer, hiredis.ReplyError):  # NOAUTH, a wrong password: Redis cannot be used as configured
            raise ConnectionError(str(answer))
        return int(answer)

    async def listen(self, heard: Callable[[str], None]) -> Subscription:
        """Subscribes on a new connection: once this returns, every message published is given to `heard`."""
        writer = None
        try:
            async with asyncio.timeout(self._timeout_s):
                reader, writer = await open_connection(self._args)
                hello = [*session_commands(self._args, select=False), pack(("CLIENT", "SETNAME", self.name))]
                writer.write(b"".join([*hello, pack(("SUBSCRIBE", self.name))]))
                parser = await _subscribed(reader)
        except BaseException as e:
            if writer is not None:
                writer.close()
            if isinstance(e, (OSError, TimeoutError, hiredis.ProtocolError)) and not isinstance(e, ConnectionError):
                raise ConnectionError(f"{type(e).__name__}: {e}") from e
            raise
        return Subscription(reader, writer, parser, heard, timeout_s=self._timeout_s, check_every_s=self._check_every_s)

    def close(self) -> None:
        self._pipe.close()


async def _subscribed(reader: asyncio.StreamReader) -> Any:
    """Reads the session's answers up to the subscription's confirmation; answers the parser, holding what came after
    it. An error answered (NOAUTH, a wrong password) is a `ConnectionError`."""
    parser = hiredis.Reader()
    while True:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("Redis closed the connection")
        parser.feed(data)
        while (reply := parser.gets()) is not False:
            if isinstance(reply, hiredis.ReplyError):
                raise ConnectionError(str(reply))
            if isinstance(reply, list) and reply[:1] == [b"subscribe"]:
                return parser


class Subscription:
    """A connection subscribed to one channel."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        parser: Any,  # a hiredis.Reader, already fed what came with the confirmation
        heard: Callable[[str], None],
        *,
        timeout_s: float,
        check_every_s: float,
    ) -> None:
        self._timeout_s = timeout_s
        self._check_every_s = check_every_s
        self._reader = reader
        self._writer = writer
        self._parser = parser
        self._heard = heard

    async def until_lost(self) -> str:
        """Gives each message to `heard` until the connection closes or stops answering; says why it ended."""
        self._take()
        asked = False
        while True:
            try:
                async with asyncio.timeout(self._timeout_s if asked else self._check_every_s):
                    data = await self._reader.read(65536)
            except TimeoutError:
                if asked:
                    return f"no answer from Redis in {self._timeout_s} s"
                self._writer.write(pack(("PING",)))
                asked = True
                continue
            except OSError as e:
                return str(e) or type(e).__name__
            if not data:
                return "connection closed"
            asked = False  # anything read says the connection works
            self._parser.feed(data)
            try:
                self._take()
            except hiredis.ProtocolError as e:
                return f"ProtocolError: {e}"

    def _take(self) -> None:
        while (reply := self._parser.gets()) is not False:
            if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                self._heard(reply[2].decode(errors="replace"))

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):  # closing is all that is asked: a connection already broken is closed
            async with asyncio.timeout(self._timeout_s):
                await self._writer.wait_closed()
