"""The data path's HTTP/1.1 client against real sockets: small asyncio servers that answer as engines do (lengths,
chunks, keep-alive) and as broken ones do (closing idle connections, breaking off, stalling, not framing)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from orchestrator.gateway.hops import HEADER
from orchestrator.gateway.http1 import HIGH_WATER, BrokenOff, Http1Pool
from orchestrator.gateway.upstream import ConnectFailed, Redirected, Upstream

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes, bytes], Awaitable[bool]]
"""Answers one request (its head and body); returns whether to keep the connection for another."""

HOP = (HEADER, "0123456789abcdef")


class Server:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._answer(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._tasks.discard(task)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                if not await self.handler(reader, writer, head, body):
                    break


def whole(body: bytes, status: int = 200, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s" % (
        status,
        extra,
        len(body),
        body,
    )


async def echo(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _h: bytes, body: bytes) -> bool:
    w.write(whole(body))
    await w.drain()
    return True


@pytest.fixture
async def pool() -> AsyncIterator[Http1Pool]:
    p = Http1Pool(connect_timeout_s=2.0, read_timeout_s=2.0)
    try:
        yield p
    finally:
        p.close()


async def test_calls_reuse_one_connection_and_get_their_own_answers(pool: Http1Pool) -> None:
    async with Server(echo) as server:
        for i in range(30):
            answer = await pool.post(server.url, b'{"n":%d}' % i, {"Authorization": "Bearer k"}, hop=HOP)
            assert (answer.status, await answer.read()) == (200, b'{"n":%d}' % i)
            assert answer.header(b"content-type") == b"application/json"
            answer.release()
        assert server.connections == 1
        head = server.requests[0].split(b"\r\n\r\n")[0].lower()
        assert b"authorization: bearer k" in head
        assert b"x-orchestrator-hop: 0123456789abcdef" in head
        assert b"content-type: application/json" in head
        assert b"accept-encoding" not in head  # never asks for an answer it would have to decompress

        async def one(i: int) -> bytes:
            answer = await pool.post(server.url, b"%d" % i, {}, hop=HOP)
            try:
                return await answer.read()
            finally:
                answer.release()

        assert await asyncio.gather(*(one(i) for i in range(40))) == [b"%d" % i for i in range(40)]


async def test_a_stream_arrives_chunk_by_chunk(pool: Http1Pool) -> None:
    second = asyncio.Event()

    async def stream(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _h: bytes, _b: bytes) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        w.write(b"6\r\ndata 1\r\n")
        await w.drain()
        await second.wait()  # the client must have had the first event before the second is written
        w.write(b"6\r\ndata 2\r\n0\r\n\r\n")
        await w.drain()
        return True

    async with Server(stream) as server:
        answer = await pool.post(server.url, b"{}", {}, hop=HOP)
        chunks = []
        async for chunk in answer.chunks():
            chunks.append(chunk)
            second.set()
        answer.release()
        assert chunks == [b"data 1", b"data 2"]
        again = await pool.post(server.url, b"{}", {}, hop=HOP)  # the chunked answer ended cleanly: reused
        second.set()
        assert await again.read() == b"data 1data 2"
        again.release()
        assert server.connections == 1


async def test_a_server_that_closes_idle_connections_costs_no_call(pool: Http1Pool) -> None:
    async def once(r: asyncio.StreamReader, w: asyncio.StreamWriter, h: bytes, b: bytes) -> bool:
        await echo(r, w, h, b)
        return False  # closes after each answer, though it said nothing about it

    async with Server(once) as server:
        for i in range(5):
            answer = await pool.post(server.url, b"%d" % i, {}, hop=HOP)
            assert await answer.read() == b"%d" % i
            answer.release()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while server.connections == i:
                assert loop.time() < deadline
                await asyncio.sleep(0.01)
        assert server.connections == 5


async def test_a_reused_connection_closed_under_a_request_is_replaced(pool: Http1Pool) -> None:
    served: dict[asyncio.StreamWriter, int] = {}

    async def one_each(r: asyncio.StreamReader, w: asyncio.StreamWriter, h: bytes, b: bytes) -> bool:
        served[w] = served.get(w, 0) + 1
        if served[w] > 1:
            return False  # its keep-alive ran out as the request came: closed unanswered
        return await echo(r, w, h, b)

    async with Server(one_each) as server:
        for i in range(3):
            answer = await pool.post(server.url, b"%d" % i, {}, hop=HOP)
            assert await answer.read() == b"%d" % i  # each call answered, on a fresh connection when need be
            answer.release()
        assert server.connections == 3


def writes(raw: bytes, *, keep_alive: bool = False) -> Handler:
    """A server's answer to every request: `raw`, as it is; then the connection closes unless `keep_alive`."""

    async def answer(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _h: bytes, _b: bytes) -> bool:
        w.write(raw)
        await w.drain()
        return keep_alive

    return answer


async def test_an_answer_broken_off_mid_body_raises(pool: Http1Pool) -> None:
    async with Server(writes(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")) as server:
        answer = await pool.post(server.url, b"{}", {}, hop=HOP)
        with pytest.raises(BrokenOff):
            await answer.read()
        answer.release()


async def test_an_answer_framed_by_its_connection_ends_with_it(pool: Http1Pool) -> None:
    unframed = writes(b'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{"ok":true}')
    async with Server(unframed) as server:
        answer = await pool.post(server.url, b"{}", {}, hop=HOP)
        assert await answer.read() == b'{"ok":true}'
        answer.release()


async def test_endless_headers_are_refused(pool: Http1Pool) -> None:
    async def endless(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _h: bytes, _b: bytes) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\n")
        with contextlib.suppress(ConnectionError):
            for i in range(100_000):  # 4 MB of headers, unless the client hangs up first
                w.write(b"X-Filler-%d: %s\r\n" % (i, b"y" * 30))
                await w.drain()
        return False

    async with Server(endless) as server:
        with pytest.raises(BrokenOff, match="headers are longer"):
            await pool.post(server.url, b"{}", {}, hop=HOP)


async def test_a_silent_server_times_out() -> None:
    async def silent(r: asyncio.StreamReader, _w: asyncio.StreamWriter, _h: bytes, _b: bytes) -> bool:
        await r.read()  # until the client gives up
        return False

    pool = Http1Pool(connect_timeout_s=1.0, read_timeout_s=0.2)
    try:
        async with Server(silent) as server:
            with pytest.raises(TimeoutError):
                await pool.post(server.url, b"{}", {}, hop=HOP)
    finally:
        pool.close()


async def test_a_slow_reader_holds_the_stream_back_and_loses_nothing(pool: Http1Pool) -> None:
    block = bytes(range(256)) * 256  # 64 KiB
    count = 4 * HIGH_WATER // len(block)

    async def big(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _h: bytes, _b: bytes) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (count * len(block)))
        for _ in range(count):
            w.write(block)
            await w.drain()
        return True

    async with Server(big) as server:
        answer = await pool.post(server.url, b"{}", {}, hop=HOP)
        conn = answer._conn  # whether reading stopped is the point
        assert conn is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while not conn.paused:  # a relay that lags: the connection stops reading once enough waits for it
            assert loop.time() < deadline, "the connection never stopped reading"
            await asyncio.sleep(0.01)
        got = bytearray()
        async for chunk in answer.chunks():
            got += chunk
        assert bytes(got) == block * count  # and nothing was lost while it did
        assert not conn.paused
        answer.release()


async def test_cutting_an_answer_wakes_its_reader(pool: Http1Pool) -> None:
    async def endless(r: asyncio.StreamReader, w: asyncio.StreamWriter, _h: bytes, _b: bytes) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
        await w.drain()
        await r.read()
        return False

    async with Server(endless) as server:
        answer = await pool.post(server.url, b"{}", {}, hop=HOP)
        chunks = answer.chunks()
        assert await anext(chunks) == b"a"
        reading = asyncio.ensure_future(anext(chunks))
        await asyncio.sleep(0)
        answer.close()
        with pytest.raises(BrokenOff):
            await reading


async def test_upstream_refuses_redirects_bad_headers_and_closed_ports() -> None:
    moved = writes(whole(b"", status=307, extra=b"Location: http://169.254.169.254/\r\n"), keep_alive=True)

    upstream = Upstream(connect_timeout_s=1.0, read_timeout_s=1.0)
    try:
        async with Server(moved) as server:
            with pytest.raises(Redirected):
                await upstream.post(server.url, b"{}", {})
            with pytest.raises(ConnectFailed) as bad_header:
                await upstream.post(server.url, b"{}", {"Authorization": "Bearer k\r\nX-Injected: 1"})
            assert bad_header.value.refused
            assert all(b"x-injected" not in r.lower() for r in server.requests)
            port = server.port
        with pytest.raises(ConnectFailed) as closed:
            await upstream.post(f"http://127.0.0.1:{port}/v1/chat/completions", b"{}", {})
        assert closed.value.refused
    finally:
        await upstream.close()
