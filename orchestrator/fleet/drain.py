"""Draining: a replica on its way out (deleted, its model deleted, unrecoverable) stays DRAINING until the gateway's
calls on it have ended, or its drain timeout has passed, and only then goes on to TERMINATING (where a managed
replica's VM is destroyed).

New calls stop at once: the catalog drops a replica from its pools when it reloads, and it reloads on every admin
action and lifecycle move. The calls already running are counted by the catalog; the reconcile job looks at the
count on each pass (every second, and at once when the last call here on such a replica ends). Without a shared count
the count is this process's, so the calls of an instance that serves without running the jobs (`serve
--no-scheduler`, another worker) are not waited for; with `ORCH_REDIS_URL` it is every live instance's (the catalog's
`calls_on`), and a call ending elsewhere is seen at the next pass. A timeout cuts this instance's calls only.
"""

from __future__ import annotations

from datetime import UTC, datetime

from orchestrator.domain.lifecycle import ReplicaStatus
from orchestrator.gateway.catalog import Catalog
from orchestrator.store.fleet import FleetStore
from orchestrator.store.tables import Replica, row_id

S = ReplicaStatus

SETTLE_S = 0.1
"""With a shared count: how long a replica stays DRAINING at least, so that a call another instance picked just before
it heard of the drain is counted (its count is written within a few milliseconds) before "no call is left" is
believed."""


class Drain:
    """The DRAINING step of the reconcile job (both external and managed replicas take it)."""

    def __init__(self, catalog: Catalog, timeout_s: float) -> None:
        self._catalog = catalog
        self._timeout_s = timeout_s

    async def step(self, store: FleetStore, replica: Replica) -> bool:
        rid = row_id(replica.id)
        calls = self._catalog.calls_on(rid)
        if calls.routed:  # moved to DRAINING since this catalog last read the replicas (another instance did it)
            await self._catalog.reload()
            calls = self._catalog.calls_on(rid)
        # Timed from the stored move, so the timeout holds across a restart (which leaves no calls to wait for).
        waited = (datetime.now(UTC) - replica.status_changed_at).total_seconds()
        if not calls.routed and calls.in_flight == 0:
            if self._catalog.flight is not None and waited < SETTLE_S:
                return False  # the reconcile job's next pass looks again
            reason = "drained"
            message = f"drained: {_calls(calls.waited_for)} finished in {waited:.1f} s"
            if not calls.waited_for:
                message = "drained: no calls in flight"
        elif waited >= self._timeout_s:
            reason = "drain_timeout"
            # The gateway closes its connections of the calls left: each ends at once, as a broken-off replica's.
            message = f"drain timeout after {self._timeout_s:g} s: {_calls(self._catalog.cut(rid))} cut"
        else:
            return False
        moved = await store.move(rid, S.DRAINING, S.TERMINATING, reason, message)
        if moved:
            self._catalog.forget(rid)
        return moved


def _calls(n: int) -> str:
    return f"{n} in-flight call{'' if n == 1 else 's'}"
