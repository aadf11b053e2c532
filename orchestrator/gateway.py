"""The gateway's domain flow: authenticate a key, admit it under its limit, open a call to a replica with
failover, and account for the call. Everything here is served from memory.

    GatewayError
    ├── Unauthorized     no key, an unknown key, or a disabled one
    ├── RateLimited      the key's requests-per-minute are used up
    ├── UnknownModel     no live model of that name
    ├── NoReplica        the model has no READY replica with room
    └── UpstreamFailed   every replica tried refused the connection
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import structlog

from orchestrator.catalog import Catalog, KeyInfo, Target
from orchestrator.keys import hash_api_key
from orchestrator.limits import RpmLimiter
from orchestrator.upstream import ConnectFailed, Upstream
from orchestrator.usage import UsageBuffer

log = structlog.get_logger(__name__)

MAX_ATTEMPTS = 3


class GatewayError(Exception):
    pass


class Unauthorized(GatewayError):
    pass


class RateLimited(GatewayError):
    def __init__(self, allowed_rpm: int) -> None:
        super().__init__(f"Rate limit exceeded: allowed {allowed_rpm} requests per minute.")
        self.allowed_rpm = allowed_rpm


class UnknownModel(GatewayError):
    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.model = model


class NoReplica(GatewayError):
    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.model = model


class UpstreamFailed(GatewayError):
    pass


@dataclass(slots=True, frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass(slots=True)
class Call:
    target: Target
    response: aiohttp.ClientResponse
    started: float


class Gateway:
    def __init__(
        self,
        catalog: Catalog,
        upstream: Upstream,
        usage: UsageBuffer,
        secret_key: str,
        *,
        on_unreachable: Callable[[int], None],
    ) -> None:
        self.catalog = catalog
        self._upstream = upstream
        self._usage = usage
        self._secret = secret_key
        self._on_unreachable = on_unreachable
        self._limiter = RpmLimiter()

    def authenticate(self, raw_key: str | None) -> KeyInfo:
        if not raw_key:
            raise Unauthorized("missing API key")
        key = self.catalog.keys.get(hash_api_key(self._secret, raw_key))
        if key is None or not key.enabled:
            raise Unauthorized("invalid API key")
        return key

    def admit(self, key: KeyInfo) -> None:
        if not self._limiter.allow(key.id, key.allowed_rpm):
            raise RateLimited(key.allowed_rpm)

    async def open(self, model: str, path: str, body: bytes) -> Call:
        """Send `body` to `path` under a READY replica's API root; another replica on a failed connection."""
        if model not in self.catalog.models:
            raise UnknownModel(model)
        tried: set[int] = set()
        for _ in range(MAX_ATTEMPTS):
            target = self.catalog.pick(model, tried)
            if target is None:
                break
            started = time.perf_counter()
            try:
                response = await self._upstream.post(target.api_base + path, body, target.headers)
            except ConnectFailed as e:
                self.catalog.release(target)
                tried.add(target.replica_id)
                log.warning("gateway.connect_failed", replica_id=target.replica_id, refused=e.refused, error=str(e))
                if e.refused:
                    self.catalog.eject(target)
                    self._on_unreachable(target.replica_id)
                continue
            except BaseException:  # cancelled while connecting: the slot must still be given back
                self.catalog.release(target)
                raise
            return Call(target, response, started)
        if tried:
            raise UpstreamFailed(f"no replica of {model} could be reached")
        raise NoReplica(model)

    def finish(  # noqa: PLR0917  (one call site, in the order the call happened)
        self, call: Call, key: KeyInfo, model: str, status: int, usage: Usage | None, prompt: str
    ) -> None:
        """Give the replica's slot back and queue the usage row. Called exactly once per opened call."""
        self.catalog.release(call.target)
        call.response.release()
        u = usage or Usage()
        self._usage.add(
            {
                "api_key_id": key.id,
                "input": prompt,
                "created": int(time.time()),
                "model": model,
                "prompt_tokens": u.prompt_tokens,
                "completion_tokens": u.completion_tokens,
                "total_tokens": u.total_tokens,
                "duration": round(time.perf_counter() - call.started, 6),
                "replica_id": call.target.replica_id,
                "status_code": status,
            }
        )
