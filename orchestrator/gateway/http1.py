"""The data path's HTTP/1.1 client: a call's request to a replica or an endpoint, and its answer as it arrives.

Kept lean because it is most of a gateway call's CPU: keep-alive connections per origin (reused last-in first-out,
dropped after IDLE_S), each request written in one go, each answer parsed by llhttp (`httptools`) as its bytes
arrive, with its body read whole (`read`) or chunk by chunk (`chunks`, for streams; the connection stops reading
while the relay lags behind by more than HIGH_WATER bytes). An answer read to its end goes back to the pool on
`release`; one left unread, or cut (`close`), takes its connection down with it, which is what makes an engine abort
the generation. Nothing follows a redirect, asks for compression, or sends more than the caller's headers and the
framing.

Errors: connecting raises OSError (refused, a name refused by the resolver) or TimeoutError; an answer that breaks
off, or a connection lost before its answer began, raises `BrokenOff`; a stall longer than the read timeout,
TimeoutError. A reused connection found closed before any byte of its answer (the server's keep-alive ran out) is
replaced once, transparently: the request was not read by anyone.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from ipaddress import ip_address
from typing import TYPE_CHECKING, cast

import httptools

if TYPE_CHECKING:
    from aiohttp.abc import AbstractResolver

IDLE_S = 4.0
"""How long a connection waits in the pool: under the usual servers' keep-alive (uvicorn's and so vLLM's is 5 s), so
the server does not close it under a request being written."""
MAX_IDLE = 256
"""Idle connections kept per origin."""
HIGH_WATER = 256 * 1024
"""Bytes of an answer received and not yet taken, past which its connection stops reading."""
MAX_HEAD = 64 * 1024
"""Bytes of an answer's headers past which it is refused (an endpoint sending headers forever)."""


class BrokenOff(Exception):
    """The answer broke off (or never began): the connection closed, was cut, or sent what is not HTTP."""


@dataclass(frozen=True, slots=True)
class _Target:
    origin: tuple[str, str, int]
    """(scheme, host, port): connections are pooled per origin."""
    head: bytes
    """The request line and Host header."""


@functools.lru_cache(maxsize=4096)
def _target(url: str) -> _Target:
    parsed = httptools.parse_url(url.encode())
    scheme = (parsed.schema or b"").decode().lower()
    if scheme not in {"http", "https"} or not parsed.host:
        raise ValueError(f"not an http(s) URL: {url!r}")
    host = parsed.host.decode()
    port = parsed.port or (443 if scheme == "https" else 80)
    path = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
    host_header = f"[{host}]" if ":" in host else host
    if parsed.port:
        host_header += f":{port}"
    return _Target((scheme, host, port), b"POST " + path + b" HTTP/1.1\r\nHost: " + host_header.encode() + b"\r\n")


@functools.lru_cache(maxsize=256)
def _header_lines(items: tuple[tuple[str, str], ...]) -> bytes:
    """The caller's headers as sent (a JSON body's Content-Type unless they name one)."""
    out = bytearray()
    for name, value in items:
        if any(c in name or c in value for c in "\r\n\0") or not name or ":" in name:
            raise ValueError(f"a header that cannot be sent: {name!r}")
        out += f"{name}: {value}\r\n".encode("latin-1")
    if all(name.lower() != "content-type" for name, _ in items):
        out += b"Content-Type: application/json\r\n"
    return bytes(out)


async def _within(future: asyncio.Future[None], timeout_s: float, what: str, on_timeout: Callable[[], None]) -> None:
    """Wait for `future`; past `timeout_s`, it fails with TimeoutError (`what` says what did not come) and
    `on_timeout` runs. One timer, cancelled once the future is done."""

    def expire() -> None:
        if not future.done():
            future.set_exception(TimeoutError(f"{what} for {timeout_s} s"))
            on_timeout()

    timer = asyncio.get_running_loop().call_later(timeout_s, expire)
    try:
        await future
    finally:
        timer.cancel()


class Answer:
    """One request's answer: its status and headers once they arrived, then its body."""

    __slots__ = ("_buffered", "_conn", "_done", "_error", "_headers", "_parts", "_pool", "_waiter", "status")

    def __init__(self, pool: Http1Pool, conn: _Conn) -> None:
        self._pool = pool
        self._conn: _Conn | None = conn
        self.status = 0
        self._headers: dict[bytes, bytes] = {}
        self._parts: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def header(self, name: bytes) -> bytes | None:
        """A header's value (`name` in lower case), the last one if it came several times."""
        return self._headers.get(name)

    async def read(self) -> bytes:
        """The whole body."""
        parts = [part async for part in self.chunks()]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (never an empty chunk)."""
        while True:
            if self._parts:
                part = self._parts.popleft()
                self._buffered -= len(part)
                conn = self._conn
                if conn is not None and conn.paused and self._buffered < HIGH_WATER // 2:
                    conn.resume()
                yield part
            elif self._error is not None:
                raise self._error
            elif self._done:
                return
            else:
                await self._wait()

    def release(self) -> None:
        """The caller is done with the answer: its connection goes back to the pool if the answer was read to its
        end and the server keeps it open, else it is closed."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._done and not self._parts and conn.keep_alive and not conn.lost:
            conn.answer = None
            self._pool.put(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Cut the answer: its connection closes, and a reader waiting gets BrokenOff."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        self.fail(BrokenOff("the answer was cut"))

    async def _wait(self) -> None:
        self._waiter = waiter = asyncio.get_running_loop().create_future()
        try:
            await _within(waiter, self._pool.read_timeout_s, "no byte of the answer", self._stalled)
        finally:
            self._waiter = None

    def _stalled(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # Fed by the connection.

    def feed(self, part: bytes) -> None:
        self._parts.append(part)
        self._buffered += len(part)
        if self._buffered > HIGH_WATER and self._conn is not None:
            self._conn.pause()
        self._wake()

    def end(self) -> None:
        self._done = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if self._error is None and not self._done:
            self._error = error
        self._wake()


def _framed(answer: Answer) -> bool:
    return answer.header(b"content-length") is not None or answer.header(b"transfer-encoding") is not None


class _Conn(asyncio.Protocol):
    """One keep-alive connection; the answer being received is `answer`."""

    def __init__(self, origin: tuple[str, str, int]) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.answer: Answer | None = None
        self.head: asyncio.Future[None] | None = None
        """Done when the current answer's headers have arrived (or failed before)."""
        self.began = False
        """Whether any byte of the current answer arrived."""
        self.keep_alive = False
        self.lost = False
        self.paused = False
        self.idle_since = 0.0
        self.head_bytes = 0
        """Bytes of the current answer's headers so far."""

    def send(self, answer: Answer, data: bytes) -> asyncio.Future[None]:
        assert self.transport is not None
        self.answer, self.began, self.keep_alive, self.head_bytes = answer, False, False, 0
        self.head = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.head

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.abort()

    def pause(self) -> None:
        if not self.paused and self.transport is not None and not self.lost:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.lost:
            self.paused = False
            self.transport.resume_reading()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # create_connection's: a stream transport

    def data_received(self, data: bytes) -> None:
        self.began = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._failed(BrokenOff(f"the answer is not HTTP/1.1: {e}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        answer = self.answer
        if exc is None and answer is not None and answer.status and not _framed(answer):
            answer.end()  # a body without a length or chunks ends with its connection
            return
        self._failed(BrokenOff("the connection closed" + (f": {exc}" if exc else "")))

    def _failed(self, error: BrokenOff) -> None:
        if self.head is not None and not self.head.done():
            self.head.set_exception(error)
        if self.answer is not None:
            self.answer.fail(error)

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value)
        if self.head_bytes > MAX_HEAD:
            self._failed(BrokenOff(f"the answer's headers are longer than {MAX_HEAD} bytes"))
            self.close()
        elif self.answer is not None:
            self.answer._headers[name.lower()] = value  # filled by its connection

    def on_headers_complete(self) -> None:
        if self.answer is not None:
            self.answer.status = self.parser.get_status_code()
        if self.head is not None and not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.answer is not None:
            self.answer.feed(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        if self.answer is not None:
            self.answer.end()


class Http1Pool:
    """Keep-alive connections per origin, for the data path's POSTs (one pool per event loop)."""

    def __init__(
        self, *, connect_timeout_s: float, read_timeout_s: float, resolver: AbstractResolver | None = None
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._resolver = resolver
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._tls: ssl.SSLContext | None = None

    async def post(self, url: str, body: bytes, headers: dict[str, str], *, hop: tuple[str, str]) -> Answer:
        """Send `body` to `url` and return once the answer's status and headers arrived (the caller reads the body
        and calls `release`). A 3xx is returned like any answer: following it or not is the caller's choice."""
        target = _target(url)
        data = b"%s%sContent-Length: %d\r\n\r\n%s" % (
            target.head,
            _header_lines((*headers.items(), hop)),
            len(body),
            body,
        )
        conn = self._take(target.origin)
        if conn is not None:
            try:
                return await self._send(conn, data)
            except BrokenOff:
                if conn.began:
                    raise
                # Closed by the server while idle (its keep-alive ran out): the request was never read.
        return await self._send(await self._connect(target.origin), data)

    async def _send(self, conn: _Conn, data: bytes) -> Answer:
        """Write the request on `conn`; its answer once its headers arrived (the connection closed on a failure)."""
        answer = Answer(self, conn)
        try:
            await _within(conn.send(answer, data), self.read_timeout_s, "no answer", conn.close)
        except BaseException:
            conn.close()
            raise
        return answer

    def put(self, conn: _Conn) -> None:
        idle = self._idle.setdefault(conn.origin, [])
        if len(idle) >= MAX_IDLE:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def _take(self, origin: tuple[str, str, int]) -> _Conn | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        oldest_kept = time.monotonic() - IDLE_S
        while idle:
            conn = idle.pop()
            if not conn.lost and conn.idle_since >= oldest_kept:
                return conn
            conn.close()
        return None

    async def _connect(self, origin: tuple[str, str, int]) -> _Conn:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        tls = self._tls_context() if scheme == "https" else None
        error: Exception = OSError(f"{host} has no address")
        async with asyncio.timeout(self.connect_timeout_s):
            for address in await self._addresses(host, port):
                conn = _Conn(origin)
                try:
                    await loop.create_connection(
                        lambda c=conn: c,
                        address,
                        port,
                        ssl=tls,
                        server_hostname=host if tls is not None else None,
                    )
                except OSError as e:
                    error = e
                    continue
                sock = conn.transport.get_extra_info("socket") if conn.transport is not None else None
                if sock is not None and sock.family in {socket.AF_INET, socket.AF_INET6}:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return conn
        raise error

    async def _addresses(self, host: str, port: int) -> list[str]:
        try:
            return [str(ip_address(host))]  # a literal: judged when its URL was saved, never resolved
        except ValueError:
            pass
        if self._resolver is not None:
            return [a["host"] for a in await self._resolver.resolve(host, port, socket.AF_UNSPEC)]
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return [str(info[4][0]) for info in infos]

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def close(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()
