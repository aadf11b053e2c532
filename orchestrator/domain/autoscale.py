"""The autoscaler's decision: how many replicas a deployment wants, from what its engines and the gateway report.

Pure (no clock, no I/O): the caller passes `now`, so the reconcile job, the tests and the fleet simulation in
`scripts/` run the very same code, the simulation in compressed time.
"""

from __future__ import annotations

import math
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
    """Keeps, per deployment, since when the load has been above or below its target (the delays' memory), and
    how many calls one replica was seen to run at once when calls waited (what one replica fewer would lose).

    Rules, in order: the bounds first (`current` outside [min, max] is brought back at once); from zero, any call
    that found no replica (or waits) asks for one replica at once; with no READY replica yet, nothing moves (those
    wanted are starting). Then waiting per READY replica above `target_waiting` for `scale_up_delay_s` adds enough
    replicas to bring it under the target (each new one running what a full one was seen to run; at most twice as
    many as wanted), unless some wanted are still starting; the load still under the target with one replica fewer
    for `scale_down_delay_s` removes one. Each move restarts both delays, so one burst is one step up, and a step
    down is never followed by a step up unless the load itself grows: one replica fewer must carry what runs now.

    A hold's reason stays the same from one look to the next while the situation does (it is written where it
    changes: a deployment's message, a log line); a move's reason carries the numbers that made it.
    """

    _above_since: dict[int, float] = field(default_factory=dict)
    _below_since: dict[int, float] = field(default_factory=dict)
    _per_replica: dict[int, float] = field(default_factory=dict)
    """Calls one replica ran at once while calls waited (it was full): the most seen, per deployment."""

    def decide(self, key: int, policy: AutoscalePolicy, current: int, load: Load | None, now: float) -> Decision:
        """The replica count deployment `key` should have; `current` is how many it wants now (not how many are
        READY). Without a load report (no READY replica scraped yet) the count stays where it is, within bounds."""
        lo, hi = policy.min_replicas, max(policy.min_replicas, policy.max_replicas)
        if current < lo or current > hi:
            self._restart(key)
            bound = lo if current < lo else hi
            return Decision(bound, f"{current} wanted is outside [{lo}, {hi}]: {bound}")
        if load is None:
            return Decision(current, "no load report yet: kept")
        if current == 0:
            return self._from_zero(key, policy, load, hi)
        return self._measured(key, policy, current, load, now)

    def _measured(self, key: int, policy: AutoscalePolicy, current: int, load: Load, now: float) -> Decision:
        """`current` replicas wanted, at least one: up, down or kept on what the READY ones report."""
        if load.ready == 0:
            self._restart(key)
            return Decision(current, f"no READY replica yet: waiting for the {current} wanted")
        if load.waiting > 0:
            full = load.running / load.ready
            self._per_replica[key] = max(self._per_replica.get(key, 0.0), full)
        per = load.waiting / load.ready
        if per > policy.target_waiting:
            return self._up(key, policy, current, load, now)
        self._above_since.pop(key, None)
        if current > policy.min_replicas and self._fewer_would_carry(key, policy, current, load):
            return self._down(key, policy, current, load, now)
        self._below_since.pop(key, None)
        return Decision(current, f"steady: at most {policy.target_waiting:g} waiting per READY replica")

    def forget(self, key: int) -> None:
        """Deployment `key` is gone (or no longer autoscaled): its memory goes too."""
        self._restart(key)
        self._per_replica.pop(key, None)

    def _restart(self, key: int) -> None:
        self._above_since.pop(key, None)
        self._below_since.pop(key, None)

    def _from_zero(self, key: int, policy: AutoscalePolicy, load: Load, hi: int) -> Decision:
        self._restart(key)
        if hi == 0 or (load.unserved <= 0 and load.waiting <= 0):
            return Decision(0, "scaled to zero: no call waiting")
        wanted = max(1, policy.min_replicas)
        asked = f"{load.unserved} call(s) found no replica" if load.unserved else f"{load.waiting:.0f} waiting"
        return Decision(wanted, f"{asked}: waking from zero")

    def _up(self, key: int, policy: AutoscalePolicy, current: int, load: Load, now: float) -> Decision:
        hi = max(policy.min_replicas, policy.max_replicas)
        self._below_since.pop(key, None)
        since = self._above_since.setdefault(key, now)
        over = f"waiting {load.waiting:.1f} > {policy.target_waiting:g} x {load.ready} ready"
        above = f"more than {policy.target_waiting:g} waiting per READY replica"
        if current > load.ready:
            # What waited while they start is no measure of the load they will meet: the line drains once they
            # are READY. Judged again a whole delay after, or a slow boot would ask for replicas at every delay.
            self._above_since[key] = now
            return Decision(current, f"{current - load.ready} starting: judged again once READY")
        if now - since < policy.scale_up_delay_s:
            return Decision(current, f"{above}: more after {policy.scale_up_delay_s:g} s of it")
        # At most double: a line that built up while replicas started drains long before the next ones start.
        desired = min(hi, 2 * current, max(current + 1, self._needed(key, policy, load)))
        if desired == current:
            return Decision(current, f"{above}: already at max {hi}")
        self._restart(key)
        return Decision(desired, f"{over} for {now - since:.0f} s: {desired}")

    def _needed(self, key: int, policy: AutoscalePolicy, load: Load) -> int:
        """Replicas that would run what runs and waits now with at most `target_waiting` left waiting on each:
        each runs what one was seen to run when full, and lets the target wait (`ceil(demand / (full + target))`).
        """
        per_replica = self._per_replica.get(key, 0.0) + policy.target_waiting
        if per_replica <= 0:  # nothing seen running and no waiting allowed: one more at a time
            return 0
        return math.ceil((load.running + load.waiting) / per_replica)

    def _fewer_would_carry(self, key: int, policy: AutoscalePolicy, current: int, load: Load) -> bool:
        """Whether one replica fewer than `current` would still have its waiting calls under the target: what
        runs now past what the remaining replicas were seen to run at once would wait too."""
        fewer = current - 1
        if load.unserved > 0:
            return False
        if fewer == 0:
            return load.running <= 0 and load.waiting <= 0
        full = self._per_replica.get(key)
        waiting = load.waiting if full is None else max(0.0, load.running + load.waiting - full * fewer)
        return waiting <= 0 or waiting / fewer < policy.target_waiting

    def _down(self, key: int, policy: AutoscalePolicy, current: int, load: Load, now: float) -> Decision:
        since = self._below_since.setdefault(key, now)
        under = f"{load.running:.0f} running, {load.waiting:.1f} waiting would fit {current - 1}"
        if now - since < policy.scale_down_delay_s:
            return Decision(current, f"{current - 1} would do: fewer after {policy.scale_down_delay_s:g} s of it")
        self._restart(key)
        return Decision(current - 1, f"{under} for {now - since:.0f} s: {current - 1}")
