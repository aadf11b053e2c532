"""The upstream session's name resolution, guarded at connect time: a name that resolves to an address no admin URL
may name (link-local, unspecified, multicast, reserved: `platform.outbound`) is refused when it is used, not
only when its URL is saved. So a name whose DNS answer changes after the check (DNS rebinding onto a cloud's
metadata address) still never reaches it. IP literals never come here (aiohttp connects to them directly); they
were judged for good when saved."""

from __future__ import annotations

import socket
from ipaddress import ip_address

import structlog
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from orchestrator.platform.outbound import IpNetwork, kind_refused

log = structlog.get_logger(__name__)


class GuardedResolver(AbstractResolver):
    def __init__(self, allowed: tuple[IpNetwork, ...] = (), inner: AbstractResolver | None = None) -> None:
        self._allowed = allowed
        self._inner = inner
        """Created on first use (aiohttp's resolvers belong to the running loop); a seam for tests."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self._inner is None:
            self._inner = DefaultResolver()
        answers = await self._inner.resolve(host, port, family)
        kept = [a for a in answers if kind_refused(ip_address(a["host"]), self._allowed) is None]
        if not kept:
            why = kind_refused(ip_address(answers[0]["host"]), self._allowed) if answers else "nothing"
            log.warning("upstream.name_refused", host=host, address=answers[0]["host"] if answers else None, why=why)
            raise OSError(f"{host} resolves to {why}, which is never called")
        return kept

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()
