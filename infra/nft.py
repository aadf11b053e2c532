"""nftables for sandbox and machine VMs: one `inet` table per VM address, holding its security rules.

Every rule carries a comment that encodes the `Rule` it enforces, so what the kernel enforces can be read
back and compared with what is stored (drift). Ingress to the VM's address that no rule allows is
rejected with a TCP reset (an immediate, unambiguous "closed"); egress is open, as on Hyperstack.

Where ingress is filtered depends on where the VM is: a loopback sandbox address is delivered locally (the
`input` hook); a machine behind a veth is reached by this host's own connections (`output`) and by routed
ones (`forward`), the place a cloud's security group sits, outside the VM.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import astuple

from infra.vm import BackendError, Rule

TABLE_PREFIX = "orch_sandbox_"
DENY = "orchestrator: default deny"
"""The comment of a table's reject lines (the `hosts` backend's tables use it too)."""
_RULE = "orchestrator: "
TIMEOUT_S = 10.0
LOCAL_HOOKS = ("input",)
"""Ingress hooks of an address this host owns (a loopback sandbox)."""
ROUTED_HOOKS = ("output", "forward")
"""Ingress hooks of an address behind an interface of this host (a machine on a veth)."""
OPEN_TO_ALL = Rule("ingress", "tcp", "IPv4", "0.0.0.0/0", 0, 65535)
"""What an unrecognised table means for drift: assume the worst."""


def available() -> str | None:
    """None when rules can be enforced here, else why not (for a loud warning at start)."""
    if shutil.which("nft") is None:
        return "the `nft` command is not installed (Debian package `nftables`)"
    try:
        _nft("list", "tables")
    except BackendError as e:
        return f"`nft` cannot change the ruleset here (root is needed): {e}"
    return None


def table_name(address: str) -> str:
    return TABLE_PREFIX + address.replace(".", "_")


def address_of(table: str) -> str | None:
    if not table.startswith(TABLE_PREFIX):
        return None
    return table.removeprefix(TABLE_PREFIX).replace("_", ".")


def script(address: str, rules: Iterable[Rule], hooks: Sequence[str] = LOCAL_HOOKS) -> str:
    """The whole table, replaced atomically (`nft -f` applies a script as one transaction)."""
    name = table_name(address)
    ingress: list[str] = []
    egress: list[str] = []
    for rule in sorted(set(rules)):
        (ingress if rule.direction == "ingress" else egress).append(_line(address, rule))
    ingress += [
        f'ip daddr {address} meta l4proto tcp reject with tcp reset comment "{DENY}"',
        f'ip daddr {address} meta l4proto udp reject comment "{DENY}"',
    ]
    chains = [(f"ingress_{hook}", hook, ingress) for hook in hooks]
    # Egress rules are accepts under an accept policy: kept so the table states the whole desired set.
    chains.append(("egress", "postrouting", egress))
    lines = [f"table inet {name} {{"]
    for chain, hook, body in chains:
        lines += [f"  chain {chain} {{ type filter hook {hook} priority 0; policy accept;"]
        lines += [f"    {line}" for line in body]
        lines += ["  }"]
    lines.append("}")
    # `add` then `delete` makes the delete safe when the table does not exist yet.
    return f"add table inet {name}\ndelete table inet {name}\n" + "\n".join(lines) + "\n"


def _line(address: str, rule: Rule) -> str:
    net = ipaddress.ip_network(rule.remote_ip_prefix, strict=False)
    family = "ip" if net.version == 4 else "ip6"
    ports = f"{rule.port_range_min}-{rule.port_range_max}"
    peer = "saddr" if rule.direction == "ingress" else "daddr"
    own = "daddr" if rule.direction == "ingress" else "saddr"
    # An IPv6 rule never concerns the sandbox's IPv4 address; it is kept (as an accept, a no-op under the
    # accept policy) so the table states the whole desired set.
    scope = f"ip {own} {address} " if family == "ip" else "meta nfproto ipv6 "
    return f'{scope}{family} {peer} {net} {rule.protocol} dport {ports} accept comment "{encode_rule(rule)}"'


def encode_rule(rule: Rule) -> str:
    """The comment of the line that enforces `rule`: `decode_rule` reads the rule back from it."""
    return _RULE + " ".join(map(str, astuple(rule)))


def decode_rule(comment: str) -> Rule | None:
    """The rule an `encode_rule` comment names; None for any other comment."""
    parts = comment.removeprefix(_RULE).split()
    if not comment.startswith(_RULE) or len(parts) != 6:
        return None
    direction, protocol, ethertype, prefix, low, high = parts
    if direction not in {"ingress", "egress"} or protocol not in {"tcp", "udp"} or ethertype not in {"IPv4", "IPv6"}:
        return None
    return Rule(direction, protocol, ethertype, prefix, int(low), int(high))  # type: ignore[arg-type]


def apply(address: str, rules: Iterable[Rule], hooks: Sequence[str] = LOCAL_HOOKS) -> None:
    _nft("-f", "-", stdin=script(address, rules, hooks))


def delete(address: str) -> None:
    _nft("-f", "-", stdin=f"add table inet {table_name(address)}\ndelete table inet {table_name(address)}\n")


def enforced(address: str, hooks: Sequence[str] = LOCAL_HOOKS) -> frozenset[Rule]:
    """The rules the kernel enforces for `address`; a missing table, a missing default deny (two in each
    ingress hook) or a rule this module did not write reads as open to all."""
    try:
        items = _nft_json("list", "table", "inet", table_name(address))
    except BackendError:  # no such table (nft says "No such file or directory")
        return frozenset({OPEN_TO_ALL})
    rules: set[Rule] = set()
    denies = 0
    for item in items:
        if "rule" not in item:
            continue
        comment = str(item["rule"].get("comment", ""))
        if comment == DENY:
            denies += 1
        else:
            rules.add(decode_rule(comment) or OPEN_TO_ALL)
    if denies != 2 * len(hooks):
        rules.add(OPEN_TO_ALL)
    return frozenset(rules)


def sandbox_tables() -> list[str]:
    """Addresses that have a sandbox table in the kernel."""
    names = [str(t["table"]["name"]) for t in _nft_json("list", "tables") if "table" in t]
    return [a for a in map(address_of, names) if a is not None]


def _nft_json(*args: str) -> list[dict[str, dict[str, object]]]:
    out = _nft("-j", *args)
    items: list[dict[str, dict[str, object]]] = json.loads(out)["nftables"]
    return items


def _nft(*args: str, stdin: str | None = None) -> str:
    try:
        done = subprocess.run(  # noqa: S603 (arguments built here)
            ["nft", *args],  # noqa: S607 (PATH finds nft wherever the distribution puts it)
            input=stdin,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BackendError(f"nft {args[0]} failed: {e}") from e
    if done.returncode != 0:
        raise BackendError(f"nft {' '.join(args[:3])} failed: {done.stderr.strip()[:300]}")
    return done.stdout
