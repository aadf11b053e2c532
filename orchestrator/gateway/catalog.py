"""What the gateway serves from memory: API keys by hash (with the models each may call, where they may be
used from and what they may still spend), live models with their prices and credit rates, and what serves each
model: its READY replicas, and the external llm_endpoint named like it.

Reloaded from the store whenever an admin action or a health move changes it, here or in another process (the
change feed, orchestrator.store.notify), and periodically as a net. Reloads keep the Target objects of replicas
that stay, so in-flight counts survive. With a shared count (`ORCH_REDIS_URL`, orchestrator.platform.redis_flight)
every call picked and released is counted over every instance too, and endpoints' gates are shared.
"""

from __future__ import annotations

import ipaddress
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import structlog

from orchestrator.billing.ledger import Ledger
from orchestrator.domain.spend import CONNECTOR, Account
from orchestrator.gateway.engine_urls import engine_urls, external_api_base
from orchestrator.gateway.limits import Gate, SharedGate, TokenBucket
from orchestrator.platform.outbound import IpNetwork
from orchestrator.platform.redis_flight import SharedFlight
from orchestrator.platform.secrets import SecretBox
from orchestrator.store.gateway_view import GatewayView, GatewayViewStore
from orchestrator.store.tables import ApiKey, ExternalEndpoint, LlmModel, row_id

log = structlog.get_logger(__name__)

EJECT_S = 5.0  # how long a replica that refused a connection stays out of the pool before a retry
LEFT_KEPT_S = 600.0
"""How long a replica that left the pool with calls in flight is remembered once they ended: its drain reads how many
there were within a second; this only bounds what an instance that runs no drain keeps."""


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
    allowed_ips: tuple[IpNetwork, ...] = ()
    """Where the key may be used from; empty: anywhere."""

    def allows(self, address: str | None) -> bool:
        if not self.allowed_ips:
            return True
        try:
            ip = ipaddress.ip_address(address or "")
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:  # a dual-stack listener's IPv4 peer
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.allowed_ips)

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


@dataclass(slots=True, frozen=True)
class CreditPrice:
    """LlmEndpoint's price of a model: units per character of the user's messages, and per max_tokens asked."""

    input: int
    output: int


class Closable(Protocol):
    def close(self) -> None: ...


@dataclass(slots=True, eq=False)
class Target:
    """A READY replica, or an external llm_endpoint, as the router sees it."""

    replica_id: int | None
    """None: an external llm_endpoint (`endpoint_id`)."""
    model: str
    api_base: str
    headers: dict[str, str]
    """Sent with every call: the content type and the engine's own key (never the client's)."""
    bucket: TokenBucket | None
    inflight: int = 0
    ejected_until: float = 0.0
    endpoint_id: str | None = None
    gate: Gate | None = None
    """An endpoint's max_concurrency and max_calls_per_second: calls wait at it."""
    params: dict[str, Any] | None = None
    """An endpoint's defaults, merged into every request sent to it (its `model` replaces the client's)."""
    answers: set[Closable] = field(default_factory=set)
    """The upstream answers of its calls in flight: closed to cut them (a drain that timed out)."""

    def available(self, now: float) -> bool:
        return self.ejected_until <= now and (self.bucket is None or self.bucket.has_token(now))

    @property
    def flight_name(self) -> str:
        """Its name in the shared count of calls: the replica's id, or the endpoint's."""
        return f"r{self.replica_id}" if self.replica_id is not None else f"e{self.endpoint_id}"


@dataclass(slots=True, frozen=True)
class Calls:
    """The gateway's calls on one replica, as its drain reads them (`Catalog.calls_on`)."""

    routed: bool
    """Still in a pool: new calls may be sent to it (this catalog has not reloaded since it left READY)."""
    in_flight: int
    waited_for: int
    """In flight when it left the pool."""


@dataclass(slots=True, frozen=True)
class _Left:
    target: Target
    """The Target its calls still hold (and release)."""
    calls: int
    at: float
    """`time.monotonic()` when it left."""


class Catalog:
    def __init__(
        self,
        views: GatewayViewStore,
        box: SecretBox,
        ledger: Ledger,
        *,
        on_drained: Callable[[], None] | None = None,
        flight: SharedFlight | None = None,
    ) -> None:
        self._views = views
        self.flight = flight
        """Calls in flight counted over every instance (`ORCH_REDIS_URL`); None: this process's alone."""
        self._box = box
        self.ledger = ledger
        self.keys: dict[str, KeyInfo] = {}
        self.keys_by_id: dict[int, KeyInfo] = {}
        self.models: dict[str, ModelInfo] = {}
        self.rates: dict[str, CreditPrice] = {}
        self.pools: dict[str, list[Target]] = {}
        self.waking: frozenset[str] = frozenset()
        """Models that may have no replica for a while (a deployment scaled to zero): their calls wait in the queue
        for one to start."""
        self._unserved: Counter[str] = Counter()
        """Calls refused (or waiting) for want of a READY replica, per model, since the autoscaler last asked."""
        self._targets: dict[int, Target] = {}
        self._endpoints: dict[str, Target] = {}
        self.on_reload: Callable[[], None] | None = None
        """Told after every reload (the priority queue lets waiters onto new replicas). Set once both exist: the
        priority queue is built on the catalog, so it cannot be given here."""
        self._left: dict[int, _Left] = {}
        """Replicas that left the pool (draining, unhealthy) with calls in flight, by id."""
        self.on_drained = on_drained
        """Told when the last call on a replica that left the pool ends (the reconcile job moves it on)."""

    async def reload(self) -> None:
        # The ledger's lock: a flush of fees never lands between reading the accounts and installing them.
        async with self.ledger.lock:
            view = await self._views.read()
            self.keys = _keys(view)
            self.keys_by_id = {k.id: k for k in self.keys.values()}
            self.ledger.replace({row_id(k.id): account_of(k) for k in view.keys})
            models = {m.name: _model(m) for m in view.models}
            self.rates = {r.model: CreditPrice(r.input_rate, r.output_rate) for r in view.rates}
            targets: dict[int, Target] = {}
            pools: dict[str, list[Target]] = {}
            for row in view.ready:
                target = self._target(row.replica_id, row.model, row.endpoint, row.engine_key_sealed, row.rate_limit)
                targets[row.replica_id] = target
                pools.setdefault(row.model, []).append(target)
            endpoints: dict[str, Target] = {}
            for ep in view.endpoints:
                endpoints[ep.id] = target = self._endpoint(ep)
                pools.setdefault(ep.id, []).append(target)
                if ep.id not in models:  # the endpoint serves a model of its own name
                    models[ep.id] = ModelInfo(0, ep.id, ep.connector_type, False, 0, 0, int(ep.created_at.timestamp()))
            self._note_left(targets)
            self.models, self._targets, self._endpoints, self.pools = models, targets, endpoints, pools
            self.waking = view.waking
        if self.on_reload is not None:
            self.on_reload()

    def unserved(self, model: str) -> None:
        """A call for `model` found no READY replica: demand the autoscaler sees (`take_unserved`)."""
        self._unserved[model] += 1

    def take_unserved(self, model: str) -> int:
        """The calls for `model` that found no READY replica since the last ask."""
        return self._unserved.pop(model, 0)

    def _note_left(self, staying: dict[int, Target]) -> None:
        """Remember the replicas leaving the pool with calls in flight; forget those back in it (their Target is
        taken up again) and those whose calls ended long ago."""
        now = time.monotonic()
        for rid, old in self._targets.items():
            if rid not in staying and old.inflight > 0:
                self._left[rid] = _Left(old, old.inflight, now)
        for rid, left in list(self._left.items()):
            if rid in staying or (left.target.inflight <= 0 and now - left.at > LEFT_KEPT_S):
                del self._left[rid]

    def _target(self, replica_id: int, model: str, endpoint: str, sealed: str | None, rate_limit: int | None) -> Target:
        headers = {"Content-Type": "application/json"}
        if sealed:
            headers["Authorization"] = f"Bearer {self._box.open(sealed)}"
        api_base = engine_urls(endpoint).api_base
        old = self._targets.get(replica_id)
        if old is None and replica_id in self._left:  # back (UNHEALTHY -> READY) while calls from before still run
            old = self._left[replica_id].target
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

    def _endpoint(self, ep: ExternalEndpoint) -> Target:
        """An endpoint's Target; kept across reloads while the endpoint is unchanged (its gate holds calls)."""
        headers = {"Content-Type": "application/json"}
        token = self._box.open(ep.token_sealed) if ep.token_sealed else ""
        if token:
            headers["Authorization"] = f"Bearer {token}"
        params: dict[str, Any] = json.loads(ep.params) if ep.params else {}
        api_base = external_api_base(ep.uri)
        old = self._endpoints.get(ep.id)
        limits = (ep.max_concurrency, ep.max_calls_per_second)
        gate = None
        if old is not None and old.gate is not None and (old.gate.concurrency, old.gate.per_second) == limits:
            if (old.api_base, old.headers, old.params) == (api_base, headers, params or None):
                return old
            gate = old.gate  # the calls in flight hold its slots: the limits stay whole across the change
        if gate is None and self.flight is not None and any(limits):
            gate = SharedGate(ep.max_concurrency, ep.max_calls_per_second, self.flight, ep.id)
        return Target(
            replica_id=None,
            model=ep.id,
            api_base=api_base,
            headers=headers,
            bucket=None,
            endpoint_id=ep.id,
            gate=gate or Gate(ep.max_concurrency, ep.max_calls_per_second),
            params=params or None,
        )

    def pick(self, model: str, exclude: set[Target] | frozenset[Target] = frozenset()) -> Target | None:
        """Least in-flight of two random available replicas (power of two choices); takes its slot."""
        pool = self.pools.get(model)
        if not pool:
            return None
        now = time.monotonic()
        candidates = [t for t in pool if t not in exclude and t.available(now)]
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
        if self.flight is not None:
            self.flight.started(chosen.flight_name)
        return chosen

    def release(self, target: Target) -> None:
        target.inflight -= 1
        if self.flight is not None:
            self.flight.ended(target.flight_name)
        if target.inflight == 0 and self._left and self.on_drained is not None and target.replica_id is not None:
            left = self._left.get(target.replica_id)
            if left is not None and left.target is target:
                self.on_drained()

    def in_flight(self, targets: Sequence[Target]) -> list[int]:
        """The calls in flight on each target: over every instance with a shared count that answers, else here."""
        if self.flight is not None:
            names = [t.flight_name for t in targets]
            others = self.flight.others(names)
            if others is not None:
                return [self.flight.mine(name) + n for name, n in zip(names, others, strict=True)]
        return [t.inflight for t in targets]

    def calls_on(self, replica_id: int) -> Calls:
        """A replica's calls: routed to it still, or in flight since it left the pool (at any instance, with a shared
        count; `waited_for` is this instance's)."""
        target = self._targets.get(replica_id)
        if target is not None:
            return Calls(routed=True, in_flight=target.inflight, waited_for=0)
        left = self._left.get(replica_id)
        here = max(0, left.target.inflight) if left is not None else 0
        elsewhere = 0
        if self.flight is not None:
            name = f"r{replica_id}"
            others = self.flight.others([name])
            elsewhere = others[0] if others is not None else 0
            here = max(here, self.flight.mine(name))
        if left is None:
            return Calls(routed=False, in_flight=here + elsewhere, waited_for=0)
        return Calls(routed=False, in_flight=here + elsewhere, waited_for=left.calls)

    def refuse(self, key_id: int) -> None:
        """Refuse the key from now on (it is being deleted); the next reload installs what the database says."""
        key = self.keys_by_id.get(key_id)
        if key is not None:
            for key_hash, info in self.keys.items():
                if info is key:
                    self.keys[key_hash] = replace(key, enabled=False)
                    break

    def cut(self, replica_id: int) -> int:
        """Close the upstream answers of the calls still on a replica (its drain timed out): each call ends at once,
        as a replica that broke off does. Returns how many were cut."""
        left = self._left.get(replica_id)
        target = left.target if left is not None else self._targets.get(replica_id)
        if target is None:
            return 0
        answers, target.answers = target.answers, set()
        for answer in answers:
            answer.close()
        return len(answers)

    def forget(self, replica_id: int) -> None:
        """The replica's drain is over: what it left with need not be kept."""
        self._left.pop(replica_id, None)

    @staticmethod
    def eject(target: Target) -> None:
        target.ejected_until = time.monotonic() + EJECT_S
        log.warning("gateway.replica_ejected", replica_id=target.replica_id, endpoint=target.endpoint_id, for_s=EJECT_S)


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
        keys[k.key_hash] = KeyInfo(
            key_id, k.user_id, k.enabled, k.allowed_rpm, k.kind, k.role, k.group_id, models, networks(k.allowed_ips)
        )
    return keys


def networks(allowed_ips: str) -> tuple[IpNetwork, ...]:
    """A key's stored allowlist ("10.0.0.1, 192.168.0.0/24") as networks; the services store only valid ones."""
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in allowed_ips.split(",") if part.strip())


def _models_of(bindings: Sequence[tuple[int, int]]) -> dict[int, set[int]]:
    """(owner id, model id) pairs -> the model ids of each owner."""
    out: dict[int, set[int]] = {}
    for owner_id, model_id in bindings:
        out.setdefault(owner_id, set()).add(model_id)
    return out
