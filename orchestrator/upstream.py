"""Calls to replicas' engines: one long-lived aiohttp session shared by the gateway and the health prober.

UpstreamError
└── ConnectFailed   nothing of an answer arrived: safe to retry on another replica
"""

from __future__ import annotations

import aiohttp


class UpstreamError(Exception):
    pass


class ConnectFailed(UpstreamError):
    def __init__(self, message: str, *, refused: bool) -> None:
        super().__init__(message)
        self.refused = refused
        """The engine could not be reached at all (as opposed to a dropped keep-alive connection)."""


class Upstream:
    def __init__(self, *, connect_timeout_s: float = 5.0, read_timeout_s: float = 600.0) -> None:
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Created lazily: it must belong to the event loop that serves requests.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30),
                timeout=self._timeout,
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> aiohttp.ClientResponse:
        """Send a request and return once the answer's headers arrived; the caller reads and releases it."""
        try:
            return await self.session.post(url, data=body, headers=headers)
        except aiohttp.ClientConnectorError as e:
            raise ConnectFailed(str(e), refused=True) from e
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, TimeoutError) as e:
            raise ConnectFailed(str(e) or type(e).__name__, refused=False) from e
