"""Security rule sets of a managed replica's phases, and what a rule set lets through.

Bootstrap (and maintenance): SSH open to the orchestrator only, the engine port to the gateway only (the
prober shares the gateway's path). Serving: the engine port to the gateway only, SSH closed. The admin's own
rules (`vm_creation_details.security_rules`) are kept in every phase, so they are judged by what they open: no
set of them may open SSH beyond the orchestrator's CIDR or the engine port beyond the gateway's (`rule_problems`).
A rule opening exactly one of those ports to everyone (what the toolkit's UI always sends) is the exception: it
is replaced by the orchestrator's own rules for that port, and never stored (`replaced_rules`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Network, IPv6Network

from infra.vm import Rule
from orchestrator.store.tables import ReplicaSecurityRule


class Phase(StrEnum):
    USER = "user"
    """The admin's rules, kept in every phase."""
    BOOTSTRAP = "bootstrap"
    """SSH from the orchestrator and the engine port from the gateway (also the maintenance set)."""
    SERVING = "serving"
    """The engine port from the gateway; SSH closed."""


@dataclass(frozen=True)
class ConnectionSources:
    """Where the orchestrator's two kinds of connections come from."""

    orchestrator_cidr: str
    gateway_cidr: str
    ssh_source_address: str | None = None
    """Local address the SSH client binds to, so the VM's firewall can tell it from the gateway."""
    foreign_source_address: str | None = None
    """Local address outside both CIDRs that SECURING probes from, as a stranger would connect; None where this
    machine has no such vantage point (then the check says it did not probe from outside)."""

    def __post_init__(self) -> None:
        foreign = self.foreign_source_address
        if foreign is None:
            return
        address = ipaddress.ip_address(foreign)
        for who, cidr in (("orchestrator", self.orchestrator_cidr), ("gateway", self.gateway_cidr)):
            if address in ipaddress.ip_network(cidr, strict=False):
                raise ValueError(f"the foreign source {foreign} is inside the {who}'s CIDR {cidr}: it proves nothing")


def phase_rules(phase: Phase, net: ConnectionSources, *, engine_port: int, ssh_port: int) -> tuple[Rule, ...]:
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


Net = IPv4Network | IPv6Network
OPENING_PROTOCOLS = frozenset({"tcp"})
"""Protocols whose rules open the managed ports (SSH and HTTP are TCP); "any" would belong here if rules had it."""
MAX_PORT = 65535


def prefix_network(prefix: str, ethertype: str) -> Net:
    """The network a rule's `remote_ip_prefix` names, strictly; ValueError saying what is wrong otherwise.

    Host bits are allowed (10.0.0.1/8 is 10.0.0.0/8, as clouds read it); a scope id is not: it names an interface
    of the machine that wrote it, which nft and the clouds refuse (a replica failed there, not at the API)."""
    if "%" in prefix:
        raise ValueError("An IPv6 scope id (%...) names a local interface; a rule's prefix cannot carry one.")
    try:
        net = ipaddress.ip_network(prefix, strict=False)
    except ValueError:
        raise ValueError("Not a valid IP network (CIDR).") from None
    if f"IPv{net.version}" != ethertype:
        raise ValueError(f"An {ethertype} rule needs an {ethertype} prefix.")
    return net


def rule_problems(rules: Sequence[Rule], net: ConnectionSources, *, engine_port: int, ssh_port: int) -> list[str]:
    """What is wrong with the admin's `rules` for a replica whose engine listens on `engine_port`: values that no
    firewall would take, and managed ports opened beyond who may reach them (SSH: the orchestrator, the engine
    port: the gateway). Empty when nothing is. Each rule must stay inside that CIDR, so their union does too;
    `replaced_rules` are not judged, since they are never applied."""
    problems: list[str] = []
    nets: list[Net | None] = []
    for i, rule in enumerate(rules):
        try:
            net_of_rule = _checked(rule)
        except ValueError as e:
            problems.append(f"security_rules[{i}]: {e}")
            nets.append(None)
            continue
        # A replaced rule opens nothing: the orchestrator's own rules govern its port.
        nets.append(None if _replaced(rule, net_of_rule, (engine_port, ssh_port)) else net_of_rule)
    managed = (
        (ssh_port, f"SSH (port {ssh_port})", "the orchestrator", net.orchestrator_cidr),
        (engine_port, f"The engine port ({engine_port})", "the gateway", net.gateway_cidr),
    )
    for port, what, who, cidr in managed:
        allowed = ipaddress.ip_network(cidr, strict=False)
        beyond = [
            (i, n)
            for i, (rule, n) in enumerate(zip(rules, nets, strict=True))
            if n is not None and _opens(rule, port) and not _inside(n, allowed)
        ]
        if beyond:
            by = ", ".join(f"security_rules[{i}]" for i, _ in beyond)
            problems.append(
                f"{what} would be open to {_union(n for _, n in beyond)} by {by}; only {who} ({cidr}) may reach it."
            )
    return problems


def replaced_rules(rules: Sequence[Rule], *, engine_port: int, ssh_port: int) -> list[tuple[int, Rule]]:
    """The admin's rules (with their index) that open one managed port, SSH or the engine port, alone and to
    everyone (a prefix of length 0, IPv4 or IPv6): the toolkit's UI always sends them, and the toolkit replaces
    them with its own. So does the orchestrator: its phase rules open those ports to whom they belong, and these
    are never stored or applied. A rule that opens a managed port to a narrower network, or other ports beside it,
    is the admin's to fix (`rule_problems`)."""
    replaced = []
    for i, rule in enumerate(rules):
        try:
            net = _checked(rule)
        except ValueError:
            continue
        if _replaced(rule, net, (engine_port, ssh_port)):
            replaced.append((i, rule))
    return replaced


def replaced_message(replaced: Sequence[tuple[int, Rule]], net: ConnectionSources, *, engine_port: int) -> str:
    """What a replica's event says of its `replaced_rules`."""
    named = ", ".join(
        f"security_rules[{i}] ({r.direction} {r.protocol} {r.ethertype} {r.remote_ip_prefix} port {r.port_range_min})"
        for i, r in replaced
    )
    return (
        f"{named}: open to everyone, replaced by the orchestrator's own rules and never applied "
        f"(SSH is opened to the orchestrator ({net.orchestrator_cidr}) only, while it bootstraps or recovers the VM; "
        f"the engine port {engine_port} to the gateway ({net.gateway_cidr}) only)."
    )


def _replaced(rule: Rule, net: Net, ports: tuple[int, ...]) -> bool:
    return (
        net.prefixlen == 0
        and rule.direction == "ingress"
        and rule.protocol in OPENING_PROTOCOLS
        and rule.port_range_min == rule.port_range_max
        and rule.port_range_min in ports
    )


def _checked(rule: Rule) -> Net:
    if not 1 <= rule.port_range_min <= rule.port_range_max <= MAX_PORT:
        raise ValueError(f"The port range must be within 1..{MAX_PORT}, min <= max.")
    return prefix_network(rule.remote_ip_prefix, rule.ethertype)


def _opens(rule: Rule, port: int) -> bool:
    return (
        rule.direction == "ingress"
        and rule.protocol in OPENING_PROTOCOLS
        and rule.port_range_min <= port <= rule.port_range_max
    )


def _inside(net: Net, allowed: Net) -> bool:
    return net.version == allowed.version and net.subnet_of(allowed)  # type: ignore[arg-type]  # same version


def _union(nets: Iterable[Net]) -> str:
    """The smallest list of networks covering `nets` (0.0.0.0/1 and 128.0.0.0/1 read 0.0.0.0/0)."""
    every = list(nets)
    v4 = ipaddress.collapse_addresses(n for n in every if isinstance(n, IPv4Network))
    v6 = ipaddress.collapse_addresses(n for n in every if isinstance(n, IPv6Network))
    return ", ".join(str(n) for n in [*v4, *v6])


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
