"""The reconcile job: moves each replica one step along its lifecycle, picked by its stored status.

Each step is load -> act -> apply with a guarded move, so a step that races another worker, or a
server restarted in the middle, simply finds the replica where the winner left it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog

from orchestrator.domain.lifecycle import ReplicaStatus
from orchestrator.fleet.drain import Drain
from orchestrator.fleet.managed import MANAGED_STEPS, ManagedReplicas
from orchestrator.store.fleet import FleetStore
from orchestrator.store.tables import Replica, row_id

log = structlog.get_logger(__name__)

S = ReplicaStatus
# A step returns whether it moved the replica; a pass that moved something is followed by another,
# so a replica walks several cheap steps at once instead of one per tick.
Step = Callable[[FleetStore, Replica], Awaitable[bool]]
MAX_PASSES = 8


async def _pending(store: FleetStore, replica: Replica) -> bool:
    if replica.create_vm:
        return False  # without a VM backend (no `managed`), a managed replica waits
    return await store.move(row_id(replica.id), S.PENDING, S.STARTING, "registered", f"probing {replica.endpoint}")


async def _draining(store: FleetStore, replica: Replica) -> bool:
    # Without a Drain (no gateway in this process to wait for), nothing here is in flight.
    return await store.move(row_id(replica.id), S.DRAINING, S.TERMINATING, "drained")


async def _terminating(store: FleetStore, replica: Replica) -> bool:
    if replica.vm_id is not None:
        return False  # a VM to destroy needs a VM backend; the replica waits here rather than leak it
    return await store.move(row_id(replica.id), S.TERMINATING, S.TERMINATED, "destroyed", "nothing left to destroy")


STEPS: dict[ReplicaStatus, Step] = {
    S.PENDING: _pending,
    S.DRAINING: _draining,
    S.TERMINATING: _terminating,
}


async def reconcile(store: FleetStore, managed: ManagedReplicas | None = None, drain: Drain | None = None) -> bool:
    """Passes over every replica some step applies to, until one moves nothing (or MAX_PASSES).
    Managed replicas' VM work is launched as tasks (`managed.settle()` waits for them); DRAINING replicas wait
    for the gateway's calls on them (`drain`). Returns whether any replica moved here."""
    steps = STEPS if drain is None else {**STEPS, S.DRAINING: drain.step}
    moved = False
    for _ in range(MAX_PASSES):
        if not await _one_pass(store, managed, steps):
            break
        moved = True
    return moved


async def _one_pass(store: FleetStore, managed: ManagedReplicas | None, steps: dict[ReplicaStatus, Step]) -> bool:
    moved = False
    statuses = set(steps) | (MANAGED_STEPS if managed else set())
    for replica in await store.replicas_in(sorted(statuses)):
        status = S(replica.status)
        if managed is not None and replica.create_vm and status in MANAGED_STEPS:
            managed.launch(replica)  # slow work (cloud calls, SSH) never holds up the pass
            continue
        step = steps.get(status)
        if step is None:
            continue
        try:
            moved |= await step(store, replica)
        except Exception:  # one failing replica never stops the others
            log.exception("reconcile.step_failed", replica_id=replica.id, status=replica.status)
    return moved
