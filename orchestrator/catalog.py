"""What the gateway serves from memory: API keys by hash, live models, and the READY replicas of each.

Reloaded from the store whenever an admin action or a health move changes it (and periodically, for changes
made by another instance). Reloads keep the Target objects of replicas that stay, so in-flight counts survive.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import structlog

from orchestrator.crypto import SecretBox
from orchestrator.endpoints import engine_urls
from orchestrator.limits import TokenBucket
from orchestrator.store import Store
from orchestrator.tables import row_id

log = structlog.get_logger(__name__)

EJECT_S = 5.0  # how long a replica that refused a connection stays out of the pool before a retry


@dataclass(slots=True, frozen=True)
class KeyInfo:
    id: int
    user_id: str
    enabled: bool
    allowed_rpm: int


@dataclass(slots=True, eq=False)
class Target:
    """A READY replica as the router sees it."""

    replica_id: int
    model: str
    api_base: str
    headers: dict[str, str]
    """Sent with every call: the content type and the engine's own key (never the client's)."""
    bucket: TokenBucket | None
    inflight: int = 0
    ejected_until: float = 0.0

    def available(self, now: float) -> bool:
        return self.ejected_until <= now and (self.bucket is None or self.bucket.has_token(now))


class Catalog:
    def __init__(self, store: Store, box: SecretBox) -> None:
        self._store = store
        self._box = box
        self._lock = asyncio.Lock()
        self.keys: dict[str, KeyInfo] = {}
        self.models: frozenset[str] = frozenset()
        self.pools: dict[str, list[Target]] = {}
        self._targets: dict[int, Target] = {}

    async def reload(self) -> None:
        async with self._lock:
            view = await self._store.gateway_view()
            self.keys = {k.key_hash: KeyInfo(row_id(k.id), k.user_id, k.enabled, k.allowed_rpm) for k in view.keys}
            targets: dict[int, Target] = {}
            pools: dict[str, list[Target]] = {}
            for row in view.ready:
                target = self._target(row.replica_id, row.model, row.endpoint, row.engine_key_sealed, row.rate_limit)
                targets[row.replica_id] = target
                pools.setdefault(row.model, []).append(target)
            self._targets, self.pools, self.models = targets, pools, frozenset(view.models)

    def _target(self, replica_id: int, model: str, endpoint: str, sealed: str | None, rate_limit: int | None) -> Target:
        headers = {"Content-Type": "application/json"}
        if sealed:
            headers["Authorization"] = f"Bearer {self._box.open(sealed)}"
        api_base = engine_urls(endpoint).api_base
        old = self._targets.get(replica_id)
        if old is not None and (old.api_base, old.headers, old.model) == (api_base, headers, model):
            if (old.bucket.rate if old.bucket else None) != rate_limit:
                old.bucket = TokenBucket(rate_limit) if rate_limit else None
            return old
        return Target(
            replica_id=replica_id,
            model=model,
            api_base=api_base,
            headers=headers,
            bucket=TokenBucket(rate_limit) if rate_limit else None,
        )

    def pick(self, model: str, exclude: frozenset[int] | set[int] = frozenset()) -> Target | None:
        """Least in-flight of two random available replicas (power of two choices); takes its slot."""
        pool = self.pools.get(model)
        if not pool:
            return None
        now = time.monotonic()
        candidates = [t for t in pool if t.replica_id not in exclude and t.available(now)]
        if not candidates:
            return None
        if len(candidates) == 1:
            chosen = candidates[0]
        else:
            a, b = random.sample(candidates, 2)
            chosen = a if a.inflight <= b.inflight else b
        if chosen.bucket is not None:
            chosen.bucket.take()
        chosen.inflight += 1
        return chosen

    @staticmethod
    def release(target: Target) -> None:
        target.inflight -= 1

    @staticmethod
    def eject(target: Target) -> None:
        target.ejected_until = time.monotonic() + EJECT_S
        log.warning("gateway.replica_ejected", replica_id=target.replica_id, for_s=EJECT_S)
