"""The autoscaler's decision: how many replicas a deployment wants, from what its engines and the gateway report.

Pure (no clock, no I/O): the caller passes `now`, so the reconcile job, the tests and the fleet simulation in
`scripts/` run the very same code, the simulation in compressed time.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AutoscalePolicy:
    """Bounds and targets of one deployment's autoscaling."""

    min_replicas: int
    """0 allows scaling to zero: the first call then waits in the gateway's queue while a replica starts."""
    max_replicas: int
    target_waiting: float = 2.0
    """Requests waiting per READY replica (engines' `vllm:num_requests_waiting` plus the gateway's queue)
    above which the deployment grows."""
    scale_up_delay_s: float = 30.0
    """How long the load must stay above the target before a replica is added."""
    scale_down_delay_s: float = 300.0
    """How long the load must stay below what one replica fewer would carry before one is removed."""


@dataclass(frozen=True)
class Load:
    """One deployment's load at one instant, summed over its READY replicas."""

    ready: int
    running: float = 0.0
    """`vllm:num_requests_running`, summed."""
    waiting: float = 0.0
    """`vllm:num_requests_waiting`, summed, plus the calls waiting in the gateway's queue for this model."""
    kv_cache: float = 0.0
    """`vllm:kv_cache_usage_perc`, the mean over the replicas (0..1)."""
    unserved: int = 0
    """Calls the gateway could not place since the last look (no READY replica): the signal to wake from zero."""


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str
    """Why, in words fit for an event and a log line (`"waiting 7.0 > 2.0 x 2 ready for 30 s"`)."""


@dataclass
class Autoscaler:
    """Keeps, per deployment, since when the load has been above or below its target (the delays' memory)."""

    _above_since: dict[int, float] = field(default_factory=dict)
    _below_since: dict[int, float] = field(default_factory=dict)

    def decide(self, key: int, policy: AutoscalePolicy, current: int, load: Load | None, now: float) -> Decision:
        """The replica count deployment `key` should have; `current` is how many it wants now (not how many are
        READY). Without a load report (no READY replica scraped yet) the count stays where it is, within bounds."""
        raise NotImplementedError  # filled in by the autoscaling work of this issue
