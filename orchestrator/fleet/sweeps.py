"""The two fleet-wide safety jobs of managed replicas: re-apply drifted security rules, destroy orphan VMs."""

from __future__ import annotations

import structlog

from infra.vm import BackendError, Rule, VmHandle
from orchestrator.domain.lifecycle import ReplicaStatus
from orchestrator.fleet.managed import ManagedReplicas
from orchestrator.fleet.security_rules import rule_of
from orchestrator.store.tables import Replica, row_id

log = structlog.get_logger(__name__)
S = ReplicaStatus
# Statuses in which a VM exists and its rules are settled (PROVISIONING and TERMINATING are in motion).
_SETTLED = (S.BOOTSTRAPPING, S.STARTING, S.SECURING, S.READY, S.UNHEALTHY)


async def rules_drift(managed: ManagedReplicas) -> list[int]:
    """Re-apply the stored rule set wherever what is enforced differs. Returns the replicas repaired."""
    repaired = []
    for replica in await managed.store.replicas_in(_SETTLED):
        rid = row_id(replica.id)
        if not replica.create_vm or replica.vm_address is None or managed.busy(rid):
            continue
        try:
            if await _repair(managed, replica):
                repaired.append(rid)
        except BackendError as e:
            log.warning("rules_drift.failed", replica_id=rid, error=str(e))
    return repaired


async def _repair(managed: ManagedReplicas, replica: Replica) -> bool:
    rid = row_id(replica.id)
    desired = frozenset(rule_of(r) for r in await managed.store.security_rules(rid))
    handle = VmHandle(
        rid, replica.vm_id or "", replica.vm_address or "", replica.ssh_port or 22, replica.ssh_user or ""
    )
    enforced = await managed.in_thread(managed.backend.enforced_rules, handle)
    if enforced == desired:
        return False
    await managed.in_thread(managed.backend.apply_rules, managed.request(replica, ()), sorted(desired))
    message = (
        f"re-applied the stored rules; missing: {_show(desired - enforced)}; unexpected: {_show(enforced - desired)}"
    )
    log.warning("rules_drift.repaired", replica_id=rid, message=message)
    await managed.store.record(rid, "rules_drift", message)
    return True


def _show(rules: frozenset[Rule]) -> str:
    if not rules:
        return "none"
    return ", ".join(
        f"{r.direction} {r.protocol} {r.remote_ip_prefix} {r.port_range_min}-{r.port_range_max}" for r in sorted(rules)
    )


async def orphan_sweep(managed: ManagedReplicas) -> list[int]:
    """Destroy what the backend owns for replicas the database does not know or has terminated."""
    owned = await managed.in_thread(managed.backend.owned)
    # Read after `owned`: a replica's row always exists before anything is allocated for it.
    statuses = await managed.store.replica_statuses()
    destroyed = []
    for rid in sorted(r for r in owned if statuses.get(r, S.TERMINATED) is S.TERMINATED):
        if managed.busy(rid):
            continue
        try:
            await managed.in_thread(managed.backend.destroy, rid)
        except BackendError as e:
            log.warning("orphan_sweep.failed", replica_id=rid, error=str(e))
            continue
        log.warning("orphan_sweep.destroyed", replica_id=rid, known=rid in statuses)
        if rid in statuses:
            await managed.store.record(
                rid, "orphan_destroyed", "the backend still held a VM for this terminated replica"
            )
        destroyed.append(rid)
    return destroyed
