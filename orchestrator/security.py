"""Security rule sets of a managed replica's phases, and what a rule set lets through.

Bootstrap (and maintenance): SSH open to the orchestrator only, the engine port to the gateway only (the
prober shares the gateway's path). Serving: the engine port to the gateway only, SSH closed. The admin's own
rules (`vm_creation_details.security_rules`) are kept in every phase; they may not touch the two managed ports.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from infra.vm import Rule
from orchestrator.tables import ReplicaSecurityRule


class Phase(StrEnum):
    USER = "user"
    """The admin's rules, kept in every phase."""
    BOOTSTRAP = "bootstrap"
    """SSH from the orchestrator and the engine port from the gateway (also the maintenance set)."""
    SERVING = "serving"
    """The engine port from the gateway; SSH closed."""


@dataclass(frozen=True)
class Network:
    """Where the orchestrator's two kinds of connections come from."""

    orchestrator_cidr: str
    gateway_cidr: str
    ssh_source_address: str | None = None
    """Local address the SSH client binds to, so the VM's firewall can tell it from the gateway."""


def phase_rules(phase: Phase, net: Network, *, engine_port: int, ssh_port: int) -> tuple[Rule, ...]:
    engine = _ingress(net.gateway_cidr, engine_port)
    if phase is Phase.BOOTSTRAP:
        return (_ingress(net.orchestrator_cidr, ssh_port), engine)
    if phase is Phase.SERVING:
        return (engine,)
    raise ValueError(f"{phase} is not an orchestrator phase")


def _ingress(cidr: str, port: int) -> Rule:
    v4 = ipaddress.ip_network(cidr, strict=False).version == 4
    return Rule("ingress", "tcp", "IPv4" if v4 else "IPv6", cidr, port, port)


def allows(rules: Iterable[Rule], source: str, port: int, protocol: str = "tcp") -> bool:
    """Whether an ingress connection from `source` to `port` passes `rules` (everything else is denied)."""
    address = ipaddress.ip_address(source)
    for rule in rules:
        if rule.direction != "ingress" or rule.protocol != protocol:
            continue
        if rule.port_range_min <= port <= rule.port_range_max and address in ipaddress.ip_network(
            rule.remote_ip_prefix, strict=False
        ):
            return True
    return False


def source_of(cidr: str) -> str:
    """A representative address of a CIDR (its first host), for checks of what a rule set lets through."""
    net = ipaddress.ip_network(cidr, strict=False)
    return str(net.network_address if net.num_addresses == 1 else next(net.hosts()))


def rule_of(row: ReplicaSecurityRule) -> Rule:
    return Rule(
        row.direction,  # type: ignore[arg-type]  # the schema layer admits only the Literal's values
        row.protocol,  # type: ignore[arg-type]
        row.ethertype,  # type: ignore[arg-type]
        row.remote_ip_prefix,
        row.port_range_min,
        row.port_range_max,
    )


def rows_of(replica_id: int, phase: Phase, rules: Sequence[Rule]) -> list[ReplicaSecurityRule]:
    return [
        ReplicaSecurityRule(
            replica_id=replica_id,
            origin=phase.value,
            direction=r.direction,
            protocol=r.protocol,
            ethertype=r.ethertype,
            remote_ip_prefix=r.remote_ip_prefix,
            port_range_min=r.port_range_min,
            port_range_max=r.port_range_max,
        )
        for r in rules
    ]
