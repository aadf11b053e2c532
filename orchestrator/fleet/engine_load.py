"""The engines' load, as the autoscaler reads it: vLLM's `/metrics` scraped from every READY replica, the latest
sample of each kept in memory, summed per model with what the gateway of this process reports (its queue's waits,
its calls that found no replica).

A scrape asks every READY replica at once (`concurrency` at a time), each with a short timeout, sending the
replica's engine key as the health prober does (vLLM does not guard `/metrics`, a proxy in front of it may). A
replica that does not answer keeps no sample: its load is unknown, not zero, and a model none of whose replicas
answered has no load (`load` is None, and the autoscaler keeps its count). Samples of replicas no longer READY
are dropped at each scrape.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import aiohttp
import structlog
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.domain.autoscale import AutoscalePolicy, Autoscaler, Decision, Load
from orchestrator.domain.lifecycle import ReplicaStatus
from orchestrator.gateway.engine_urls import engine_urls
from orchestrator.gateway.upstream import Upstream
from orchestrator.platform.secrets import SecretBox
from orchestrator.store.fleet import FleetStore
from orchestrator.store.tables import row_id

log = structlog.get_logger(__name__)

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_CACHE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
"""vLLM's KV-cache usage (0..1): its name since V1, and the name of older releases."""
_MAX_BYTES = 4 * 1024 * 1024
"""A `/metrics` page past this is not an engine's: the scrape fails rather than read it all."""


@dataclass(frozen=True)
class EngineSample:
    """What one replica's engine reported at one scrape."""

    replica_id: int
    model_id: int
    model: str
    running: float
    waiting: float
    kv_cache: float
    at: float
    """`time.monotonic()` of the scrape."""


def _none(_model: str) -> int:
    return 0


class ScrapeFailed(Exception):
    """A replica's `/metrics` could not be read or parsed; the text says why (never the engine's key)."""


class EngineLoad:
    def __init__(
        self,
        store: FleetStore,
        upstream: Upstream,
        box: SecretBox,
        *,
        queued: Callable[[str], int] = _none,
        unserved: Callable[[str], int] = _none,
        timeout_s: float = 2.0,
        concurrency: int = 64,
        on_scraped: Callable[[Mapping[int, EngineSample]], None] | None = None,
    ) -> None:
        self._store = store
        self._upstream = upstream
        self._box = box
        self._queued = queued
        """Calls waiting in this process's gateway queue for a replica of the model with room."""
        self._unserved = unserved
        """Calls for the model this process's gateway refused for want of a READY replica since the last ask."""
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._concurrency = concurrency
        self._on_scraped = on_scraped
        self._samples: dict[int, EngineSample] = {}
        self._models: dict[int, str] = {}
        """Every active model's name by id, as of the last scrape (a model with no replica has a load too)."""
        self._failing: dict[int, str] = {}
        """Replicas whose last scrape failed, and why: logged when that changes, not at every scrape."""

    @property
    def samples(self) -> Mapping[int, EngineSample]:
        """The latest sample of every READY replica that answered its last scrape, by replica id."""
        return self._samples

    async def scrape(self) -> int:
        """Scrape every READY replica once, concurrently; returns how many answered."""
        replicas = [(r, m) for r, m in await self._store.replicas_with_model((ReplicaStatus.READY,)) if r.endpoint]
        self._models = {row_id(m.id): m.name for m in await self._store.list_models()}
        gate = asyncio.Semaphore(self._concurrency)

        async def one(endpoint: str, sealed: str | None, model: str) -> tuple[float, float, float] | str:
            async with gate:
                try:
                    return await self._read(endpoint, sealed, model)
                except ScrapeFailed as e:
                    return str(e)

        results = await asyncio.gather(*(one(r.endpoint or "", r.engine_key_sealed, m) for r, m in replicas))
        now = time.monotonic()
        samples: dict[int, EngineSample] = {}
        for (replica, model), got in zip(replicas, results, strict=True):
            rid = row_id(replica.id)
            if isinstance(got, str):
                if self._failing.get(rid) != got:
                    log.warning("engine_load.scrape_failed", replica_id=rid, model=model, error=got)
                self._failing[rid] = got
                continue
            self._failing.pop(rid, None)
            samples[rid] = EngineSample(rid, replica.model_id, model, *got, at=now)
        for gone in set(self._failing) - {row_id(r.id) for r, _ in replicas}:
            del self._failing[gone]
        self._samples = samples
        if self._on_scraped is not None:
            self._on_scraped(samples)
        return len(samples)

    async def _read(self, endpoint: str, sealed: str | None, model: str) -> tuple[float, float, float]:
        """(running, waiting, KV-cache usage) from one engine's `/metrics`."""
        try:
            url = f"{engine_urls(endpoint).origin}/metrics"
        except ValueError as e:
            raise ScrapeFailed(f"endpoint does not parse: {e}") from e
        key = self._box.open(sealed) if sealed else None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            async with self._upstream.session.get(url, headers=headers, timeout=self._timeout) as r:
                if r.status != 200:
                    raise ScrapeFailed(f"GET /metrics answered {r.status}")
                text = (await r.content.read(_MAX_BYTES)).decode(errors="replace")
        except (aiohttp.ClientError, TimeoutError) as e:
            what = f"{type(e).__name__}: {e}" if str(e) else f"{type(e).__name__} (no answer in time)"
            raise ScrapeFailed(f"GET /metrics: {what.replace(key, '***') if key else what}") from e
        return parse_metrics(text, model)

    def load_of(self, model_id: int) -> Load | None:
        """Model `model_id`'s load over its READY replicas' latest samples, with the gateway's queue waits and
        unserved calls; None when no replica answered and the gateway has nothing waiting or refused."""
        return self.load(model_id, [s.replica_id for s in self._samples.values() if s.model_id == model_id])

    def load(self, model_id: int, replica_ids: Iterable[int]) -> Load | None:
        """The load of `replica_ids` (those with a sample), with the gateway's for model `model_id`."""
        samples = [s for rid in replica_ids if (s := self._samples.get(rid)) is not None]
        model = self._models.get(model_id) or next((s.model for s in samples), None)
        queued = self._queued(model) if model else 0
        unserved = self._unserved(model) if model else 0
        if not samples and not queued and not unserved:
            return None
        return Load(
            ready=len(samples),
            running=sum(s.running for s in samples),
            waiting=sum(s.waiting for s in samples) + queued,
            kv_cache=sum(s.kv_cache for s in samples) / len(samples) if samples else 0.0,
            unserved=unserved,
        )


def parse_metrics(text: str, model: str) -> tuple[float, float, float]:
    """(running, waiting, KV-cache usage) from a vLLM `/metrics` page: counts summed over its samples (one per
    engine core when vLLM runs several), the KV-cache usage their mean; samples labelled with another model_name
    are not this model's. A page without the two counts is no vLLM's."""
    values: dict[str, list[float]] = {}
    try:
        for family in text_string_to_metric_families(text):
            if family.name not in {RUNNING, WAITING, *KV_CACHE}:
                continue
            for sample in family.samples:
                if sample.labels.get("model_name", model) == model and sample.name == family.name:
                    values.setdefault(family.name, []).append(sample.value)
    except ValueError as e:  # the parser's word for text that is not Prometheus's format
        raise ScrapeFailed(f"GET /metrics: not Prometheus text: {str(e)[:200]}") from e
    if RUNNING not in values or WAITING not in values:
        raise ScrapeFailed(f"GET /metrics: no {RUNNING} and {WAITING} for model {model!r}")
    kv = next((values[name] for name in KV_CACHE if name in values), [0.0])
    return sum(values[RUNNING]), sum(values[WAITING]), sum(kv) / len(kv)


class ObservedAutoscaler(Autoscaler):
    """The autoscaler, its decisions told: a log line and `on_decision` (the metrics) whenever the count changes."""

    def __init__(self, on_decision: Callable[[int, int, Decision], None] | None = None) -> None:
        super().__init__()
        self._on_decision = on_decision

    def decide(self, key: int, policy: AutoscalePolicy, current: int, load: Load | None, now: float) -> Decision:
        decision = super().decide(key, policy, current, load, now)
        if decision.desired != current:
            log.info(
                "autoscale.decided",
                deployment_id=key,
                current=current,
                desired=decision.desired,
                reason=decision.reason,
            )
        if self._on_decision is not None:
            self._on_decision(key, current, decision)
        return decision
