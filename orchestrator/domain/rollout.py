"""What a deployment's keeper does next: from the replicas a deployment made and what it wants, how many to make,
which to drain, and the deployment's status with why. Pure, so every case is a table in a unit test.

A replica counts for a deployment while it is alive (not DRAINING, TERMINATING or TERMINATED). Those of the
current template `generation` are "new", the others "old". With old ones alive the deployment rolls: up to
`max_surge` new replicas beyond the count are made first, and one old replica is drained per new one READY.
A new replica that fails stops the roll (`rollout_failed`): the new ones not READY are drained and the old ones
keep serving. Without old ones, missing replicas are made and surplus ones drained (those not yet READY first); but
once `max_failed_starts` replicas in a row failed, none is made any more (`failing`) until the template changes or
an admin retries. A replica fails when it ends for a reason of its own (not drained by anyone) without ever being
READY, or within `min_served_s` of its first READY: an engine that crashes soon after it starts to serve would
otherwise be replaced, one VM boot at a time, forever.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from orchestrator.domain.lifecycle import (
    NOT_FAILURES,
    REASON_ROLLED,
    REASON_ROLLOUT_STOPPED,
    REASON_SCALED_DOWN,
    ReplicaStatus,
)

S = ReplicaStatus
GONE = frozenset({S.DRAINING, S.TERMINATING, S.TERMINATED})
"""Statuses of a replica on its way out: it no longer counts for its deployment."""
_NOT_YET_READY = (S.PENDING, S.PROVISIONING, S.BOOTSTRAPPING, S.STARTING, S.SECURING)


class DeploymentStatus(StrEnum):
    STEADY = "steady"
    """As many replicas of the current template as wanted, all READY."""
    SCALING = "scaling"
    """Replicas being made (a new count, or one that ended being replaced) or drained to reach the count."""
    ROLLING = "rolling"
    """Replicas of an older template being replaced: new ones first, then one old one drained per new READY one."""
    ROLLOUT_FAILED = "rollout_failed"
    """A replica of the new template failed (ended without ever being READY, or soon after): the roll stopped, the
    old replicas serve."""
    FAILING = "failing"
    """Replicas failed (ended without ever being READY, or soon after) too many times in a row: none is made until
    the template changes or an admin retries."""


@dataclass(frozen=True)
class Member:
    """A replica the deployment made."""

    id: int
    status: ReplicaStatus
    generation: int
    ever_ready: bool = False
    termination_reason: str | None = None
    served_s: float | None = None
    """Seconds from its first READY to its end (its first move to DRAINING, TERMINATING or TERMINATED); None while
    it is alive, or when it was never READY."""
    counted: bool = True
    """Made since the deployment's attempts were last reset (a template change, an admin's retry): only those count
    towards `failing` and `rollout_failed`."""

    @property
    def alive(self) -> bool:
        return self.status not in GONE

    def failed(self, min_served_s: float) -> bool:
        """Ended for a reason of its own (not drained by anyone), without ever being READY or within
        `min_served_s` of its first READY."""
        return (
            self.counted
            and not self.alive
            and self.termination_reason is not None
            and self.termination_reason not in NOT_FAILURES
            and (not self.ever_ready or (self.served_s is not None and self.served_s < min_served_s))
        )

    def how_it_ended(self) -> str:
        if self.ever_ready and self.served_s is not None:
            return f"ended {self.served_s:.0f} s after its first READY"
        return "ended without ever being READY"


@dataclass(frozen=True)
class Target:
    generation: int
    """The current template's."""
    desired: int
    max_surge: int = 1
    max_failed_starts: int = 3
    min_served_s: float = 600.0
    """A replica that ends sooner after its first READY (for a reason of its own) is a failure."""


@dataclass(frozen=True)
class Drain:
    replica_id: int
    reason: str
    """The replica's termination reason (`scaled_down`, `rolled`, `rollout_stopped`)."""


@dataclass(frozen=True)
class Plan:
    create: int
    drain: tuple[Drain, ...]
    status: DeploymentStatus
    message: str


def plan(members: list[Member], target: Target) -> Plan:
    alive = [m for m in members if m.alive]
    old = [m for m in alive if m.generation != target.generation]
    new = [m for m in members if m.generation == target.generation]
    failures = _failures_in_a_row(new, target.min_served_s)
    if old:
        if failures:
            return _stop_roll(alive, old, failures[0], target)
        return _roll(alive, old, target)
    if len(failures) >= target.max_failed_starts:
        return _failing(alive, failures, target)
    return _scale(alive, target)


def _failures_in_a_row(new: list[Member], min_served_s: float) -> list[Member]:
    """The latest replicas that failed, newest first, back to the latest that was READY and did not fail."""
    failures = []
    for m in sorted(new, key=lambda m: m.id, reverse=True):
        if m.failed(min_served_s):
            failures.append(m)
        elif m.ever_ready:
            break
    return failures


def _drain_order(members: list[Member]) -> list[Member]:
    """Who goes first: not yet READY before UNHEALTHY before READY; among equals the newest."""

    def rank(m: Member) -> tuple[int, int]:
        if m.status in _NOT_YET_READY:
            return (0, -m.id)
        return (1 if m.status is not S.READY else 2, -m.id)

    return sorted(members, key=rank)


def _surplus(alive: list[Member], desired: int) -> tuple[Drain, ...]:
    """Those beyond the count, in drain order."""
    return tuple(Drain(m.id, REASON_SCALED_DOWN) for m in _drain_order(alive)[: max(0, len(alive) - desired)])


def _scale(alive: list[Member], target: Target) -> Plan:
    ready = sum(1 for m in alive if m.status is S.READY)
    create = max(0, target.desired - len(alive))
    drains = _surplus(alive, target.desired)
    if not create and not drains and ready == target.desired:
        return Plan(0, (), DeploymentStatus.STEADY, f"{ready} of {target.desired} replicas READY")
    message = f"{ready} of {target.desired} replicas READY, {len(alive)} alive"
    if create:
        message += f"; making {create}"
    if drains:
        message += f"; draining {len(drains)} beyond the count"
    return Plan(create, drains, DeploymentStatus.SCALING, message)


def _failing(alive: list[Member], failures: list[Member], target: Target) -> Plan:
    last = failures[0]
    ended = "ended without ever being READY"
    if any(m.ever_ready for m in failures):
        ended += f", or within {target.min_served_s / 60:g} min of it"
    message = (
        f"{len(failures)} replicas in a row {ended} (the last, replica {last.id}: "
        f"{last.termination_reason}); no more are made until the template changes or an admin retries"
    )
    return Plan(0, _surplus(alive, target.desired), DeploymentStatus.FAILING, message)


def _roll(alive: list[Member], old: list[Member], target: Target) -> Plan:
    new = [m for m in alive if m.generation == target.generation]
    new_ready = sum(1 for m in new if m.status is S.READY)
    # An old replica goes once a new READY one stands for it; old ones that do not serve go first.
    to_drain = max(0, len(old) + new_ready - target.desired)
    retired = sorted(old, key=lambda m: (m.status is S.READY, m.id))[:to_drain]
    left = len(alive) - len(retired)
    create = max(0, min(target.desired - len(new), target.desired + target.max_surge - left))
    message = (
        f"rolling to generation {target.generation}: {new_ready} of {target.desired} new replicas READY, "
        f"{len(old) - len(retired)} old still serving"
    )
    return Plan(create, tuple(Drain(m.id, REASON_ROLLED) for m in retired), DeploymentStatus.ROLLING, message)


def _stop_roll(alive: list[Member], old: list[Member], failed: Member, target: Target) -> Plan:
    unready = [m for m in alive if m.generation == target.generation and m.status is not S.READY]
    message = (
        f"replica {failed.id} of generation {target.generation} {failed.how_it_ended()} "
        f"({failed.termination_reason}): the roll stopped, {len(old)} replicas of the previous template keep serving"
    )
    drains = tuple(Drain(m.id, REASON_ROLLOUT_STOPPED) for m in unready)
    return Plan(0, drains, DeploymentStatus.ROLLOUT_FAILED, message)
