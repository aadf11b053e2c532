"""Prometheus metrics of the gateway and the fleet, in a registry of their own."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from orchestrator.domain.autoscale import Decision
from orchestrator.domain.lifecycle import ReplicaStatus
from orchestrator.fleet.engine_load import EngineSample

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "gateway_requests", "Gateway requests by call kind and status.", ["kind", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "gateway_request_duration_seconds",
            "Time from a request's arrival to the end of its answer.",
            ["kind"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.inflight = Gauge("gateway_inflight_requests", "Requests being answered now.", registry=self.registry)
        self.replicas = Gauge(
            "orchestrator_replicas", "Replicas by lifecycle status.", ["status"], registry=self.registry
        )

        engine = ["model", "replica_id"]
        self.engine_running = Gauge(
            "orchestrator_engine_requests_running",
            "vllm:num_requests_running of each READY replica, as last scraped.",
            engine,
            registry=self.registry,
        )
        self.engine_waiting = Gauge(
            "orchestrator_engine_requests_waiting",
            "vllm:num_requests_waiting of each READY replica, as last scraped.",
            engine,
            registry=self.registry,
        )
        self.engine_kv_cache = Gauge(
            "orchestrator_engine_kv_cache_usage",
            "vllm:kv_cache_usage_perc (0..1) of each READY replica, as last scraped.",
            engine,
            registry=self.registry,
        )
        self.autoscale_desired = Gauge(
            "orchestrator_autoscale_desired_replicas",
            "The replicas the autoscaler last wanted, per deployment.",
            ["deployment_id"],
            registry=self.registry,
        )
        self.autoscale_moves = Counter(
            "orchestrator_autoscale_decisions",
            "The autoscaler's changes of a deployment's count, by direction (up, down).",
            ["deployment_id", "direction"],
            registry=self.registry,
        )

    def engines_scraped(self, samples: Mapping[int, EngineSample]) -> None:
        """The latest scrape replaces the last one's gauges: a replica no longer READY has none."""
        for gauge in (self.engine_running, self.engine_waiting, self.engine_kv_cache):
            gauge.clear()
        for rid, s in samples.items():
            labels = (s.model, str(rid))
            self.engine_running.labels(*labels).set(s.running)
            self.engine_waiting.labels(*labels).set(s.waiting)
            self.engine_kv_cache.labels(*labels).set(s.kv_cache)

    def autoscale_decided(self, key: int, current: int, decision: Decision) -> None:
        self.autoscale_desired.labels(str(key)).set(decision.desired)
        if decision.desired != current:
            self.autoscale_moves.labels(str(key), "up" if decision.desired > current else "down").inc()

    def observe(self, kind: str, status: int, seconds: float) -> None:
        self.requests.labels(kind, str(status)).inc()
        self.latency.labels(kind).observe(seconds)

    def render(self, replicas_by_status: Mapping[str, int]) -> bytes:
        for status in ReplicaStatus:
            self.replicas.labels(status.value).set(replicas_by_status.get(status.value, 0))
        return generate_latest(self.registry)
