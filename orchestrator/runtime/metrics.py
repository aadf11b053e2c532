"""Prometheus metrics of the gateway and the fleet, in a registry of their own."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from orchestrator.domain.lifecycle import ReplicaStatus

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

    def observe(self, kind: str, status: int, seconds: float) -> None:
        self.requests.labels(kind, str(status)).inc()
        self.latency.labels(kind).observe(seconds)

    def render(self, replicas_by_status: Mapping[str, int]) -> bytes:
        for status in ReplicaStatus:
            self.replicas.labels(status.value).set(replicas_by_status.get(status.value, 0))
        return generate_latest(self.registry)
