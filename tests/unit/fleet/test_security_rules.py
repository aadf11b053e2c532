"""Admin security rules judged by what they open of SSH and the engine port, alone and together; the rule sets of
the orchestrator's phases, what a set lets through, and rules to rows and back."""

from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from infra.vm import Rule
from orchestrator.fleet.security_rules import (
    ConnectionSources,
    Phase,
    allows,
    phase_rules,
    prefix_network,
    replaced_message,
    replaced_rules,
    rows_of,
    rule_of,
    rule_problems,
    source_of,
)
from orchestrator.store.tables import ReplicaSecurityRule

ORCHESTRATOR, GATEWAY = "127.0.0.2/32", "127.0.0.1/32"
LOCAL = ConnectionSources(ORCHESTRATOR, GATEWAY, "127.0.0.2")
SANDBOX_SSH, HYPERSTACK_SSH, ENGINE = 2222, 22, 8000


def tcp(prefix: str, low: int, high: int | None = None, ethertype: str = "IPv4") -> Rule:
    return Rule("ingress", "tcp", ethertype, prefix, low, low if high is None else high)  # type: ignore[arg-type]


def problems(*rules: Rule, ssh_port: int = SANDBOX_SSH, net: ConnectionSources = LOCAL) -> list[str]:
    return rule_problems(rules, net, engine_port=ENGINE, ssh_port=ssh_port)


def test_two_halves_of_the_internet_are_the_internet() -> None:
    assert problems(tcp("0.0.0.0/1", SANDBOX_SSH), tcp("128.0.0.0/1", SANDBOX_SSH)) == [
        "SSH (port 2222) would be open to 0.0.0.0/0 by security_rules[0], security_rules[1]; "
        "only the orchestrator (127.0.0.2/32) may reach it."
    ]


def test_one_half_alone_is_refused_too() -> None:
    [problem] = problems(tcp("128.0.0.0/1", ENGINE))
    assert problem.startswith("The engine port (8000) would be open to 128.0.0.0/1 by security_rules[0]")


def test_the_ssh_port_is_the_backends() -> None:
    # The sandbox's sshd listens on 2222: that is the port to guard there, and 22 is just another port.
    assert problems(tcp("8.8.8.0/24", SANDBOX_SSH))
    assert problems(tcp("8.8.8.0/24", HYPERSTACK_SSH)) == []
    assert problems(tcp("8.8.8.0/24", HYPERSTACK_SSH), ssh_port=HYPERSTACK_SSH)


def test_a_managed_port_opened_to_everyone_alone_is_replaced_not_refused() -> None:
    # What the toolkit's UI always sends: the engine port and 22, each alone, to 0.0.0.0/0.
    ui = [tcp("0.0.0.0/0", ENGINE), tcp("0.0.0.0/0", HYPERSTACK_SSH), tcp("203.0.113.7/32", 9400)]
    assert problems(*ui, ssh_port=HYPERSTACK_SSH) == []
    assert replaced_rules(ui, engine_port=ENGINE, ssh_port=HYPERSTACK_SSH) == [(0, ui[0]), (1, ui[1])]
    v6 = tcp("::/0", SANDBOX_SSH, ethertype="IPv6")
    assert problems(v6) == []
    assert replaced_rules([v6], engine_port=ENGINE, ssh_port=SANDBOX_SSH) == [(0, v6)]


@pytest.mark.parametrize(
    "rule",
    [
        tcp("8.8.8.0/24", HYPERSTACK_SSH),  # too wide, but not everyone: the admin meant it
        tcp("0.0.0.0/1", ENGINE),
        tcp("0.0.0.0/0", ENGINE, ENGINE + 1),  # another port beside it
        tcp("0.0.0.0/0", 1, 65535),
    ],
)
def test_a_managed_port_opened_too_wide_otherwise_is_still_refused(rule: Rule) -> None:
    assert problems(rule, ssh_port=HYPERSTACK_SSH)
    assert replaced_rules([rule], engine_port=ENGINE, ssh_port=HYPERSTACK_SSH) == []


def test_only_tcp_ingress_on_a_managed_port_is_replaced() -> None:
    others = [
        Rule("ingress", "udp", "IPv4", "0.0.0.0/0", ENGINE, ENGINE),
        Rule("egress", "tcp", "IPv4", "0.0.0.0/0", ENGINE, ENGINE),
        tcp("0.0.0.0/0", 9400),  # not managed: the admin's to open
        tcp("0.0.0.0/0", HYPERSTACK_SSH),  # 22 is just another port on the sandbox
        Rule("ingress", "tcp", "IPv6", "0.0.0.0/0", ENGINE, ENGINE),  # no firewall would take it
    ]
    assert replaced_rules(others, engine_port=ENGINE, ssh_port=SANDBOX_SSH) == []


def test_the_replacement_is_named_in_one_message() -> None:
    ui = [tcp("0.0.0.0/0", ENGINE), tcp("0.0.0.0/0", HYPERSTACK_SSH)]
    replaced = replaced_rules(ui, engine_port=ENGINE, ssh_port=HYPERSTACK_SSH)
    assert replaced_message(replaced, LOCAL, engine_port=ENGINE) == (
        "security_rules[0] (ingress tcp IPv4 0.0.0.0/0 port 8000), "
        "security_rules[1] (ingress tcp IPv4 0.0.0.0/0 port 22): open to everyone, replaced by the orchestrator's "
        "own rules and never applied (SSH is opened to the orchestrator (127.0.0.2/32) only, while it bootstraps or "
        "recovers the VM; the engine port 8000 to the gateway (127.0.0.1/32) only)."
    )


def test_a_range_covering_both_ports_is_refused_for_each() -> None:
    [ssh, engine] = problems(tcp("10.0.0.0/8", 1, 65535))
    assert ssh.startswith("SSH (port 2222) would be open to 10.0.0.0/8")
    assert engine.startswith("The engine port (8000) would be open to 10.0.0.0/8")
    assert problems(tcp("10.0.0.0/8", 2223, 7999)) == []  # between the two: neither


@pytest.mark.parametrize(
    ("prefix", "low", "high"),
    [("0.0.0.0/0", 2000, 2222), ("0.0.0.0/0", 2222, 3000), ("127.0.0.0/8", 2222, 2222), ("127.0.0.2/31", 1, 9000)],
)
def test_any_rule_reaching_past_the_orchestrator_is_refused(prefix: str, low: int, high: int) -> None:
    assert problems(tcp(prefix, low, high))


def test_ipv6_halves_are_refused_and_summed_apart_from_ipv4() -> None:
    [problem] = problems(tcp("::/1", ENGINE, ethertype="IPv6"), tcp("8000::/1", ENGINE, ethertype="IPv6"))
    assert problem.startswith("The engine port (8000) would be open to ::/0 by")
    [both] = problems(tcp("0.0.0.0/0", ENGINE, ENGINE + 1), tcp("::/0", ENGINE, ENGINE + 1, ethertype="IPv6"))
    assert "open to 0.0.0.0/0, ::/0 by security_rules[0], security_rules[1]" in both


def test_rules_inside_whom_the_port_belongs_to_pass() -> None:
    assert problems(tcp(ORCHESTRATOR, SANDBOX_SSH), tcp(GATEWAY, ENGINE), tcp("203.0.113.7/32", 9400)) == []
    office = ConnectionSources("198.51.100.0/24", "203.0.113.0/24")
    assert problems(tcp("198.51.100.128/25", 22), tcp("203.0.113.7/32", ENGINE), ssh_port=22, net=office) == []
    assert problems(tcp("203.0.113.7/32", 22), ssh_port=22, net=office)  # the gateway is not the orchestrator


def test_what_does_not_open_tcp_ingress_is_not_judged() -> None:
    udp = Rule("ingress", "udp", "IPv4", "0.0.0.0/0", 1, 65535)
    egress = Rule("egress", "tcp", "IPv4", "0.0.0.0/0", 1, 65535)
    assert problems(udp, egress) == []


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (
            tcp("fe80::1%eth0/128", 9400, ethertype="IPv6"),
            "An IPv6 scope id (%...) names a local interface; a rule's prefix cannot carry one.",
        ),
        (tcp("fe80::1%1", 9400, ethertype="IPv6"), "An IPv6 scope id"),
        (tcp("10.0.0.0/8", 9400, ethertype="IPv6"), "An IPv6 rule needs an IPv6 prefix."),
        (tcp("::/0", 9400), "An IPv4 rule needs an IPv4 prefix."),
        (tcp("10.0.0.0/33", 9400), "Not a valid IP network (CIDR)."),
        (tcp("10.0.0.0/8", 0, 10), "The port range must be within 1..65535, min <= max."),
        (tcp("10.0.0.0/8", 10, 9), "The port range must be within 1..65535, min <= max."),
        (tcp("10.0.0.0/8", 1, 65536), "The port range must be within 1..65535, min <= max."),
    ],
)
def test_values_no_firewall_would_take_are_refused(rule: Rule, message: str) -> None:
    [problem] = problems(tcp(GATEWAY, ENGINE), rule)
    assert problem.startswith(f"security_rules[1]: {message}")


def test_a_prefix_is_read_as_clouds_read_it() -> None:
    assert str(prefix_network("10.0.0.1/8", "IPv4")) == "10.0.0.0/8"
    with pytest.raises(ValueError, match="scope id"):
        prefix_network("fe80::1%eth0", "IPv6")


def test_the_foreign_source_is_outside_both_cidrs() -> None:
    assert (
        ConnectionSources(ORCHESTRATOR, GATEWAY, foreign_source_address="127.0.0.3").foreign_source_address
        == "127.0.0.3"
    )
    with pytest.raises(ValueError, match=re.escape("inside the gateway's CIDR 127.0.0.0/8")):
        ConnectionSources(ORCHESTRATOR, "127.0.0.0/8", foreign_source_address="127.0.0.3")
    with pytest.raises(ValueError, match="inside the orchestrator's CIDR"):
        ConnectionSources("127.0.0.0/30", GATEWAY, foreign_source_address="127.0.0.3")


# Networks around the two sources that may be let in, and anywhere; ports at and beside the managed ones.
_networks = st.builds(
    lambda address, length: ipaddress.ip_network(f"{address}/{length}", strict=False),
    st.sampled_from(["127.0.0.1", "127.0.0.2", "127.0.0.3"]) | st.ip_addresses(v=4).map(str),
    st.integers(0, 32) | st.integers(29, 32),
)
_rules = st.builds(
    lambda net, low, span: tcp(str(net), low, min(65535, low + span)),
    _networks,
    st.sampled_from([1, 22, 2221, 2222, 2223, 7999, 8000, 8001]),
    st.sampled_from([0, 1, 300, 6000, 65535]),
)


@given(st.lists(_rules, max_size=6), st.data())
def test_accepted_rules_together_never_let_a_stranger_reach_either_port(rules: list[Rule], data: st.DataObject) -> None:
    if problems(*rules):
        return
    # What is applied: the accepted rules less those the orchestrator's own replace.
    replaced = {i for i, _ in replaced_rules(rules, engine_port=ENGINE, ssh_port=SANDBOX_SSH)}
    rules = [r for i, r in enumerate(rules) if i not in replaced]
    # Strangers where the rules point: each rule's edges, and anywhere.
    edges = [str(a) for r in rules for n in [ipaddress.ip_network(r.remote_ip_prefix)] for a in (n[0], n[-1])]
    strangers = [*edges, data.draw(st.ip_addresses(v=4).map(str))]
    for port, cidr in ((SANDBOX_SSH, ORCHESTRATOR), (ENGINE, GATEWAY)):
        for stranger in strangers:
            assert not allows(rules, stranger, port) or ipaddress.ip_address(stranger) in ipaddress.ip_network(cidr)


# -- the phases' rule sets -------------------------------------------------------------------------

CLOUD = ConnectionSources("10.0.0.0/24", "192.168.1.5/32")


def test_bootstrap_opens_ssh_to_the_orchestrator_and_the_engine_to_the_gateway() -> None:
    assert phase_rules(Phase.BOOTSTRAP, CLOUD, engine_port=ENGINE, ssh_port=HYPERSTACK_SSH) == (
        Rule("ingress", "tcp", "IPv4", "10.0.0.0/24", 22, 22),
        Rule("ingress", "tcp", "IPv4", "192.168.1.5/32", 8000, 8000),
    )


def test_serving_keeps_the_engine_port_to_the_gateway_and_closes_ssh() -> None:
    assert phase_rules(Phase.SERVING, CLOUD, engine_port=ENGINE, ssh_port=HYPERSTACK_SSH) == (
        Rule("ingress", "tcp", "IPv4", "192.168.1.5/32", 8000, 8000),
    )


def test_a_phase_rule_names_the_ethertype_of_its_cidr() -> None:
    v6 = ConnectionSources("2001:db8:1::/48", "2001:db8:2::7/128")
    ssh, engine = phase_rules(Phase.BOOTSTRAP, v6, engine_port=ENGINE, ssh_port=SANDBOX_SSH)
    assert (ssh.ethertype, ssh.remote_ip_prefix, ssh.port_range_min) == ("IPv6", "2001:db8:1::/48", SANDBOX_SSH)
    assert (engine.ethertype, engine.remote_ip_prefix) == ("IPv6", "2001:db8:2::7/128")


def test_the_admins_phase_has_no_orchestrator_rules() -> None:
    with pytest.raises(ValueError, match="user is not an orchestrator phase"):
        phase_rules(Phase.USER, CLOUD, engine_port=ENGINE, ssh_port=HYPERSTACK_SSH)


@pytest.mark.parametrize("phase", [Phase.BOOTSTRAP, Phase.SERVING])
def test_the_phases_own_rules_never_have_a_problem(phase: Phase) -> None:
    for ssh_port in (SANDBOX_SSH, HYPERSTACK_SSH):
        rules = phase_rules(phase, CLOUD, engine_port=ENGINE, ssh_port=ssh_port)
        assert rule_problems(rules, CLOUD, engine_port=ENGINE, ssh_port=ssh_port) == []


def test_what_each_phase_lets_through() -> None:
    orchestrator, gateway, stranger = source_of(CLOUD.orchestrator_cidr), source_of(CLOUD.gateway_cidr), "8.8.8.8"
    bootstrap = phase_rules(Phase.BOOTSTRAP, CLOUD, engine_port=ENGINE, ssh_port=HYPERSTACK_SSH)
    serving = phase_rules(Phase.SERVING, CLOUD, engine_port=ENGINE, ssh_port=HYPERSTACK_SSH)
    assert allows(bootstrap, orchestrator, HYPERSTACK_SSH)
    assert allows(bootstrap, gateway, ENGINE)
    assert not allows(bootstrap, gateway, HYPERSTACK_SSH)
    assert not allows(bootstrap, orchestrator, ENGINE)
    assert not allows(bootstrap, stranger, HYPERSTACK_SSH)
    assert not allows(serving, orchestrator, HYPERSTACK_SSH)
    assert allows(serving, gateway, ENGINE)
    assert not allows(serving, stranger, ENGINE)


# -- allows ----------------------------------------------------------------------------------------


def test_allows_matches_port_range_protocol_and_direction() -> None:
    rules = [tcp("10.0.0.0/8", 8000, 8010)]
    assert allows(rules, "10.1.2.3", 8000)
    assert allows(rules, "10.1.2.3", 8010)
    assert not allows(rules, "10.1.2.3", 8011)
    assert not allows(rules, "11.0.0.1", 8005)
    assert not allows(rules, "10.1.2.3", 8005, protocol="udp")
    assert allows([Rule("ingress", "udp", "IPv4", "0.0.0.0/0", 53, 53)], "1.1.1.1", 53, protocol="udp")
    assert not allows([Rule("egress", "tcp", "IPv4", "0.0.0.0/0", 1, 65535)], "1.1.1.1", 80)


def test_allows_denies_everything_without_rules_and_reads_ipv6() -> None:
    assert not allows([], "127.0.0.1", 22)
    assert allows([tcp("2001:db8::/32", 22, ethertype="IPv6")], "2001:db8::5", 22)
    assert not allows([tcp("2001:db8::/32", 22, ethertype="IPv6")], "10.0.0.1", 22)


def test_allows_refuses_what_is_not_an_address() -> None:
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        allows([tcp("0.0.0.0/0", 22)], "example.com", 22)


# -- source_of -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cidr", "source"),
    [
        ("10.0.0.0/24", "10.0.0.1"),  # the first host, not the network address
        ("10.0.0.7/24", "10.0.0.1"),  # host bits as clouds read them
        ("192.168.1.5/32", "192.168.1.5"),  # a single address is itself
        ("10.0.0.0/31", "10.0.0.0"),  # a point-to-point pair: both are hosts
        ("2001:db8::/64", "2001:db8::1"),
        ("2001:db8::7/128", "2001:db8::7"),
    ],
)
def test_the_source_of_a_cidr_is_its_first_host(cidr: str, source: str) -> None:
    assert source_of(cidr) == source


# -- rows and back ---------------------------------------------------------------------------------


def test_rules_become_rows_of_their_phase_and_come_back_the_same() -> None:
    rules = [
        *phase_rules(Phase.BOOTSTRAP, CLOUD, engine_port=ENGINE, ssh_port=HYPERSTACK_SSH),
        Rule("egress", "udp", "IPv6", "2001:db8::/32", 53, 60),
    ]
    rows = rows_of(7, Phase.BOOTSTRAP, rules)
    assert all(isinstance(row, ReplicaSecurityRule) for row in rows)
    assert [(row.replica_id, row.origin, row.id) for row in rows] == [(7, "bootstrap", None)] * 3
    assert [rule_of(row) for row in rows] == rules
    last = rows[-1]
    assert (last.direction, last.protocol, last.ethertype) == ("egress", "udp", "IPv6")
    assert (last.remote_ip_prefix, last.port_range_min, last.port_range_max) == ("2001:db8::/32", 53, 60)


def test_no_rules_no_rows() -> None:
    assert rows_of(1, Phase.USER, []) == []


def test_the_admins_rules_are_kept_as_user_rows() -> None:
    [row] = rows_of(3, Phase.USER, [tcp("10.0.0.0/8", 443)])
    assert row.origin == "user"
    assert rule_of(row) == tcp("10.0.0.0/8", 443)
