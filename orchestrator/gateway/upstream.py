"""Calls to replicas' engines: the data path's calls on the lean HTTP/1.1 client (orchestrator.gateway.http1), and
one long-lived aiohttp session for everything else (the health prober, the token counter, the engines' metrics).

Every request names this instance (orchestrator.gateway.hops) and never follows a redirect: a 3xx is an error of the
engine, raised before anyone reads it (an engine must not send the gateway, the prober or the token counter to another
host, whose answer would be relayed as the engine's).

UpstreamError
└── ConnectFailed   nothing of an answer that may be relayed arrived: safe to retry on another replica
    └── Redirected  the engine answered a 3xx

aiohttp.ClientResponseError
└── RedirectNotFollowed   what a 3xx raises on the session (Upstream.post turns it into Redirected)
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import ClientHandlerType, ClientRequest, ClientResponse
from aiohttp.abc import AbstractResolver

from orchestrator.gateway.hops import HEADER, Hops
from orchestrator.gateway.http1 import Answer, BrokenOff, Http1Pool


class UpstreamError(Exception):
    pass


class ConnectFailed(UpstreamError):
    def __init__(self, message: str, *, refused: bool) -> None:
        super().__init__(message)
        self.refused = refused
        """The engine could not be reached at all (as opposed to a dropped keep-alive connection)."""


class Redirected(ConnectFailed):
    def __init__(self, message: str) -> None:
        # Not `refused`: the engine is up (it answered), it is only not to be followed.
        super().__init__(message, refused=False)


class RedirectNotFollowed(aiohttp.ClientResponseError):
    pass


class Upstream:
    def __init__(
        self,
        *,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 600.0,
        hops: Hops | None = None,
        resolver: AbstractResolver | None = None,
    ) -> None:
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._connect_timeout_s, self._read_timeout_s = connect_timeout_s, read_timeout_s
        self._pool: Http1Pool | None = None
        self._pool_loop: asyncio.AbstractEventLoop | None = None
        self.hops = hops or Hops()
        self._resolver = resolver
        """How names are resolved (None: aiohttp's default); the server's refuses forbidden addresses."""

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Created lazily: it must belong to the event loop that serves requests.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=0, ttl_dns_cache=300, keepalive_timeout=30, resolver=self._resolver
                ),
                timeout=self._timeout,
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
                # Per request, not per session, in aiohttp: a middleware sees every response (3xx included, before
                # aiohttp would follow it) of every caller of the session, so no caller can forget it.
                middlewares=(self._hop_no_redirect,),
            )
        return self._session

    async def _hop_no_redirect(self, request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        request.headers[HEADER] = self.hops.outgoing()
        response = await handler(request)
        if 300 <= response.status < 400:  # the redirection class
            response.release()
            raise RedirectNotFollowed(
                response.request_info,
                (),
                status=response.status,
                message=f"the engine answered {response.status} (a redirect, which is never followed)",
                headers=response.headers,
            )
        return response

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Answer:
        """Send a request and return once the answer's headers arrived; the caller reads and releases it."""
        pool = self._data_pool()
        try:
            answer = await pool.post(url, body, headers, hop=(HEADER, self.hops.outgoing()))
        except BrokenOff as e:  # a connection lost before its answer began
            raise ConnectFailed(str(e), refused=False) from e
        except TimeoutError as e:
            raise ConnectFailed(str(e) or "timed out", refused=False) from e
        except (OSError, ValueError) as e:  # not connected (refused, a name refused), or a URL that cannot be called
            raise ConnectFailed(str(e) or type(e).__name__, refused=True) from e
        if 300 <= answer.status < 400:  # the redirection class
            answer.close()
            raise Redirected(f"the engine answered {answer.status} (a redirect, which is never followed)")
        return answer

    def _data_pool(self) -> Http1Pool:
        loop = asyncio.get_running_loop()
        if self._pool is None or self._pool_loop is not loop:  # a pool's connections belong to one loop
            self._pool = Http1Pool(
                connect_timeout_s=self._connect_timeout_s, read_timeout_s=self._read_timeout_s, resolver=self._resolver
            )
            self._pool_loop = loop
        return self._pool
