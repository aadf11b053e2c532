"""What the gateway serves from memory: API keys by hash (with the models each may call and what it may
still spend), live models with their prices, and the READY replicas of each.

Reloaded from the store whenever an admin action or a health move changes it (and periodically, for changes
made by another instance). Reloads keep the Target objects of replicas that stay, so in-flight counts survive.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from orchestrator.billing import CONNECTOR, Account, Ledger
from orchestrator.crypto import SecretBox
from orchestrator.endpoints import engine_urls
from orchestrator.limits import TokenBucket
from orchestrator.store import GatewayView, Store
from orchestrator.tables import ApiKey, LlmModel, row_id

log = structlog.get_logger(__name__)

EJECT_S = 5.0  # how long a replica that refused a connection stays out of the pool before a retry


@dataclass(slots=True, frozen=True)
class KeyInfo:
    id: int
    user_id: str
    enabled: bool
    allowed_rpm: int
    kind: str = "toolkit"
    role: str = "user"
    group_id: int | None = None
    models: frozenset[int] | None = None
    """Ids of the models the key may call (bound to it or to its group); None: every model."""

    @property
    def connector(self) -> bool:
        return self.kind == CONNECTOR

    @property
    def admin(self) -> bool:
        return self.role == "admin"


SERVER_ADMIN = KeyInfo(id=0, user_id="admin", enabled=True, allowed_rpm=0, kind="server", role="admin")
"""The server's own admin key (ORCH_ADMIN_API_KEY): every model, no limit, never billed or recorded as a thread."""


@dataclass(slots=True, frozen=True)
class ModelInfo:
    id: int
    name: str
    provider: str
    multiple: bool
    price_in: int
    price_out: int
    created: int
    """Unix seconds."""


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
    def __init__(self, store: Store, box: SecretBox, ledger: Ledger) -> None:
        self._store = store
        self._box = box
        self.ledger = ledger
        self.keys: dict[str, KeyInfo] = {}
        self.models: dict[str, ModelInfo] = {}
        self.pools: dict[str, list[Target]] = {}
        self._targets: dict[int, Target] = {}

    async def reload(self) -> None:
        # The ledger's lock: a flush of fees never lands between reading the accounts and installing them.
        async with self.ledger.lock:
            view = await self._store.gateway_view()
            self.keys = _keys(view)
            self.ledger.replace({row_id(k.id): account_of(k) for k in view.keys})
            self.models = {m.name: _model(m) for m in view.models}
            targets: dict[int, Target] = {}
            pools: dict[str, list[Target]] = {}
            for row in view.ready:
                target = self._target(row.replica_id, row.model, row.endpoint, row.engine_key_sealed, row.rate_limit)
                targets[row.replica_id] = target
                pools.setdefault(row.model, []).append(target)
            self._targets, self.pools = targets, pools

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


def account_of(key: ApiKey) -> Account:
    return Account(key.month_quota, key.balance, key.month_fee, key.fee_month, metered=key.kind == CONNECTOR)


def _model(m: LlmModel) -> ModelInfo:
    return ModelInfo(
        row_id(m.id), m.name, m.provider, m.multiple, m.price_in, m.price_out, int(m.created_at.timestamp())
    )


def _keys(view: GatewayView) -> dict[str, KeyInfo]:
    by_key, by_group = _models_of(view.key_models), _models_of(view.group_models)
    keys = {}
    for k in view.keys:
        key_id = row_id(k.id)
        models = None
        if k.kind == CONNECTOR:
            models = frozenset(by_key.get(key_id, set()) | by_group.get(k.group_id or 0, set()))
        keys[k.key_hash] = KeyInfo(key_id, k.user_id, k.enabled, k.allowed_rpm, k.kind, k.role, k.group_id, models)
    return keys


def _models_of(bindings: Sequence[tuple[int, int]]) -> dict[int, set[int]]:
    """(owner id, model id) pairs -> the model ids of each owner."""
    out: dict[int, set[int]] = {}
    for owner_id, model_id in bindings:
        out.setdefault(owner_id, set()).add(model_id)
    return out
