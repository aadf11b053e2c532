"""The replica lifecycle: its statuses and the pure table of allowed moves (docs/architecture.md, the lifecycle)."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from orchestrator.domain.errors import InvalidTransition


class ReplicaStatus(StrEnum):
    PENDING = "PENDING"
    """Row and desired rules written by the admin API; the reconciler has not acted yet."""
    PROVISIONING = "PROVISIONING"
    """Managed only: the backend is creating the VM (Pulumi stack `replica-<id>`)."""
    BOOTSTRAPPING = "BOOTSTRAPPING"
    """Managed only: SSH with the pinned host key installs and starts the engine."""
    STARTING = "STARTING"
    """The engine should come up: readiness probes run, refusals mean 'still loading'."""
    SECURING = "SECURING"
    """Managed only: the serving rule set is applied and verified before any traffic."""
    READY = "READY"
    """In the routing pool."""
    UNHEALTHY = "UNHEALTHY"
    """Out of the pool after failed probes or passive ejection; recovery may bring it back."""
    DRAINING = "DRAINING"
    """No new requests; waits for in-flight requests to finish."""
    TERMINATING = "TERMINATING"
    """The VM (if any) is being destroyed."""
    TERMINATED = "TERMINATED"
    """Final. The row stays for audit; `termination_reason` says why."""


S = ReplicaStatus

# The only moves the reconciler and the health job may make. DRAINING is reachable from every
# status that can carry or soon carry traffic; TERMINATING directly from the ones that never did
# (a failed provisioning must still destroy what it created).
TRANSITIONS: dict[ReplicaStatus, frozenset[ReplicaStatus]] = {
    S.PENDING: frozenset({S.PROVISIONING, S.STARTING, S.DRAINING, S.TERMINATING}),
    S.PROVISIONING: frozenset({S.BOOTSTRAPPING, S.DRAINING, S.TERMINATING}),
    S.BOOTSTRAPPING: frozenset({S.STARTING, S.DRAINING, S.TERMINATING}),
    S.STARTING: frozenset({S.SECURING, S.READY, S.DRAINING, S.TERMINATING}),
    S.SECURING: frozenset({S.READY, S.DRAINING, S.TERMINATING}),
    S.READY: frozenset({S.UNHEALTHY, S.DRAINING}),
    S.UNHEALTHY: frozenset({S.READY, S.STARTING, S.DRAINING, S.TERMINATING}),
    S.DRAINING: frozenset({S.TERMINATING}),
    S.TERMINATING: frozenset({S.TERMINATED}),
    S.TERMINATED: frozenset(),
}

# Statuses a deletion request moves to DRAINING; the others are already on their way out.
DELETABLE: frozenset[ReplicaStatus] = frozenset(s for s, nxt in TRANSITIONS.items() if S.DRAINING in nxt)

# Reasons recorded as `termination_reason`; anything but these counts as a failure.
REASON_DELETED = "deleted"
REASON_MODEL_DELETED = "model_deleted"
# A deployment's own drains (`orchestrator.fleet.deployments`): a replica beyond its count, one a roll replaced,
# a new one a failed roll gave up, every one of a deployment an admin stopped keeping.
REASON_SCALED_DOWN = "scaled_down"
REASON_ROLLED = "rolled"
REASON_ROLLOUT_STOPPED = "rollout_stopped"
REASON_DEPLOYMENT_DELETED = "deployment_deleted"
NOT_FAILURES = frozenset(
    {
        REASON_DELETED,
        REASON_MODEL_DELETED,
        REASON_SCALED_DOWN,
        REASON_ROLLED,
        REASON_ROLLOUT_STOPPED,
        REASON_DEPLOYMENT_DELETED,
    }
)


def can_move(src: ReplicaStatus, dst: ReplicaStatus) -> bool:
    return dst in TRANSITIONS[src]


def check_move(src: ReplicaStatus, dst: ReplicaStatus) -> None:
    if not can_move(src, dst):
        raise InvalidTransition(f"replica cannot move from {src} to {dst}")


VmStatus = Literal["PENDING", "SUCCESS", "FAILED"]


def vm_status(status: ReplicaStatus, termination_reason: str | None) -> VmStatus:
    """The Hyperstack toolkit's three-value view: SUCCESS when serving, FAILED when it ended badly."""
    if status is S.READY:
        return "SUCCESS"
    if status is S.TERMINATED and termination_reason not in NOT_FAILURES:
        return "FAILED"
    return "PENDING"
