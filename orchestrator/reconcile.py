"""The reconcile job: moves each replica one step along its lifecycle, picked by its stored status.

Each step is load -> act -> apply with a guarded move, so a step that races another worker, or a
server restarted in the middle, simply finds the replica where the winner left it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog

from orchestrator.lifecycle import ReplicaStatus
from orchestrator.store import Store
from orchestrator.tables import Replica

log = structlog.get_logger(__name__)

S = ReplicaStatus
Step = Callable[[Store, Replica], Awaitable[None]]


async def _pending(store: Store, replica: Replica) -> None:
    if replica.create_vm:
        return  # managed replicas wait for a VM backend to provision them
    await store.move(_id(replica), S.PENDING, S.STARTING, "registered", f"probing {replica.endpoint}")


async def _draining(store: Store, replica: Replica) -> None:
    # No router holds requests for it yet, so nothing is in flight.
    await store.move(_id(replica), S.DRAINING, S.TERMINATING, "drained")


async def _terminating(store: Store, replica: Replica) -> None:
    if replica.vm_id is not None:
        return  # a VM to destroy needs a VM backend; the replica waits here rather than leak it
    reason = replica.termination_reason or "deleted"
    await store.move(_id(replica), S.TERMINATING, S.TERMINATED, reason, "nothing left to destroy")


STEPS: dict[ReplicaStatus, Step] = {
    S.PENDING: _pending,
    S.DRAINING: _draining,
    S.TERMINATING: _terminating,
}


async def reconcile(store: Store) -> None:
    """One pass over every replica some step applies to; a failing replica never stops the others."""
    for replica in await store.replicas_in(list(STEPS)):
        try:
            await STEPS[S(replica.status)](store, replica)
        except Exception:
            log.exception("reconcile.step_failed", replica_id=replica.id, status=replica.status)


def _id(replica: Replica) -> int:
    assert replica.id is not None
    return replica.id
