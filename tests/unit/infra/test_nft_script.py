"""The nftables script of one VM address: an ingress chain per hook (the rules, then the default denies) and an
egress chain. Strings only: applying it needs root and is the system tests' part."""

from __future__ import annotations

from infra import nft
from infra.vm import Rule

SSH = Rule("ingress", "tcp", "IPv4", "198.51.100.0/24", 22, 22)
ENGINE_V6 = Rule("ingress", "tcp", "IPv6", "::/0", 8000, 8000)
DNS = Rule("egress", "udp", "IPv4", "0.0.0.0/0", 53, 53)

SSH_LINE = (
    'ip daddr 10.1.2.3 ip saddr 198.51.100.0/24 tcp dport 22-22 accept comment "orchestrator: ingress tcp IPv4'
    ' 198.51.100.0/24 22 22"'
)
ENGINE_V6_LINE = (
    'meta nfproto ipv6 ip6 saddr ::/0 tcp dport 8000-8000 accept comment "orchestrator: ingress tcp IPv6 ::/0'
    ' 8000 8000"'
)
DENY_LINES = [
    'ip daddr 10.1.2.3 meta l4proto tcp reject with tcp reset comment "orchestrator: default deny"',
    'ip daddr 10.1.2.3 meta l4proto udp reject comment "orchestrator: default deny"',
]
DNS_LINE = (
    'ip saddr 10.1.2.3 ip daddr 0.0.0.0/0 udp dport 53-53 accept comment "orchestrator: egress udp IPv4 0.0.0.0/0'
    ' 53 53"'
)


def chain(name: str, hook: str, body: list[str]) -> list[str]:
    return [
        f"  chain {name} {{ type filter hook {hook} priority 0; policy accept;",
        *(f"    {line}" for line in body),
        "  }",
    ]


def table(*chains: list[str]) -> str:
    lines = [
        "add table inet orch_sandbox_10_1_2_3",
        "delete table inet orch_sandbox_10_1_2_3",
        "table inet orch_sandbox_10_1_2_3 {",
        *(line for c in chains for line in c),
        "}",
    ]
    return "\n".join(lines) + "\n"


def test_routed_hooks_filter_ingress_on_output_and_forward() -> None:
    script = nft.script("10.1.2.3", [DNS, ENGINE_V6, SSH], hooks=nft.ROUTED_HOOKS)

    ingress = [SSH_LINE, ENGINE_V6_LINE, *DENY_LINES]
    assert script == table(
        chain("ingress_output", "output", ingress),
        chain("ingress_forward", "forward", ingress),
        chain("egress", "postrouting", [DNS_LINE]),
    )
    assert "ingress_input" not in script


def test_the_default_hooks_filter_ingress_on_input_only() -> None:
    script = nft.script("10.1.2.3", [SSH, DNS])

    assert nft.LOCAL_HOOKS == ("input",)
    assert script == table(
        chain("ingress_input", "input", [SSH_LINE, *DENY_LINES]),
        chain("egress", "postrouting", [DNS_LINE]),
    )
    assert "hook output" not in script
    assert "hook forward" not in script


def test_no_rules_leaves_only_the_two_default_denies_in_each_ingress_chain() -> None:
    script = nft.script("10.1.2.3", [], hooks=nft.ROUTED_HOOKS)

    assert script == table(
        chain("ingress_output", "output", DENY_LINES),
        chain("ingress_forward", "forward", DENY_LINES),
        chain("egress", "postrouting", []),
    )
    assert script.count('"orchestrator: default deny"') == 2 * len(nft.ROUTED_HOOKS)


def test_rules_are_deduplicated_and_the_denies_come_last() -> None:
    script = nft.script("10.1.2.3", [SSH, SSH, ENGINE_V6], hooks=nft.ROUTED_HOOKS)

    assert script.count(SSH_LINE) == len(nft.ROUTED_HOOKS)
    body = [line.strip() for line in script.splitlines()]
    for hook in nft.ROUTED_HOOKS:
        start = body.index(f"chain ingress_{hook} {{ type filter hook {hook} priority 0; policy accept;")
        assert body[start + 1 : start + 5] == [SSH_LINE, ENGINE_V6_LINE, *DENY_LINES]
        assert body[start + 5] == "}"
