"""The interface every VM backend offers the orchestrator (structural: backends do not import it).

Methods block (cloud calls, processes, Pulumi); the orchestrator calls them from worker threads, several
at once for different replicas. They raise `infra.vm.BackendError` and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from infra.vm import Rule, VmHandle, VmRequest


class VmBackend(Protocol):
    ssh_port: int
    """The port sshd listens on in this backend's VMs (needed in the bootstrap rules before the VM exists)."""

    def up(self, request: VmRequest) -> VmHandle:
        """Create the replica's VM, or converge the existing one; idempotent per `request.replica_id`.
        `request.rules` is the rule set to enforce."""
        ...

    def apply_rules(self, request: VmRequest, rules: Sequence[Rule]) -> None:
        """Converge the same VM to this rule set."""
        ...

    def enforced_rules(self, handle: VmHandle) -> frozenset[Rule]:
        """What is enforced right now, read from the cloud or the kernel (for drift detection)."""
        ...

    def destroy(self, replica_id: int) -> None:
        """Delete everything of the replica's VM; nothing there is fine. (By id, so orphans can go too.)"""
        ...

    def owned(self) -> frozenset[int]:
        """Ids of the replicas this backend has something allocated for."""
        ...
