"""What crosses the VM backend interface: the request for a VM, the handle to it, its security rules.

Plain frozen dataclasses, so the orchestrator and every backend (the local sandbox, Hyperstack through
Pulumi) agree on them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


class BackendError(Exception):
    """A backend could not do what was asked; the message says what and is safe to store in an event."""


class BackendUnavailable(BackendError):
    """The backend cannot run on this machine at all (a missing CLI, no credentials)."""


@dataclass(frozen=True, order=True)
class Rule:
    """One allowed flow, shaped as Hyperstack's security rules (and the toolkit's `security_rules`)."""

    direction: Literal["ingress", "egress"]
    protocol: Literal["tcp", "udp"]
    ethertype: Literal["IPv4", "IPv6"]
    remote_ip_prefix: str
    port_range_min: int
    port_range_max: int


@dataclass(frozen=True)
class VmRequest:
    """Everything a backend needs to create the VM of one replica; `replica_id` is the idempotency key."""

    replica_id: int
    name: str
    environment_name: str
    image_name: str
    flavor_name: str
    key_name: str
    assign_floating_ip: bool
    engine_port: int
    ssh_public_key: str
    """OpenSSH line authorised for the orchestrator's login."""
    host_public_key: str
    """OpenSSH line of the VM's host key: what the orchestrator pins before first contact."""
    host_private_key: str = field(repr=False)
    """OpenSSH PEM of the host key, injected into the VM (cloud-init) so the pinned key is the real one."""
    rules: tuple[Rule, ...] = ()
    """The bootstrap-phase rule set."""


@dataclass(frozen=True)
class VmHandle:
    """Where a created VM is reached."""

    replica_id: int
    vm_id: str
    address: str
    """Public (floating) IP, or the sandbox's own loopback address."""
    ssh_port: int
    ssh_user: str
