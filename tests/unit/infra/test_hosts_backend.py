"""The `hosts` backend's pure parts: a replica's nft table (rules kept, its engine port alone refused), read back
for drift, and the inventory of what a host holds for which replica."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from infra.hosts import (
    INVENTORY,
    OPEN_TO_ALL,
    HostLogin,
    Seat,
    inventory_ids,
    private_key,
    read_rules,
    removal,
    rules_script,
)
from infra.vm import BackendError, Rule
from provisioning.ssh_keys import generate_keypair

LOGIN = HostLogin("gpu-1", "192.0.2.10", 22, "ubuntu", "unused", "ssh-ed25519 AAAA")
SEAT = Seat(LOGIN, (0,), 8101)
GATEWAY = Rule("ingress", "tcp", "IPv4", "10.0.0.1/32", 8101, 8101)
SSH = Rule("ingress", "tcp", "IPv4", "10.0.0.2/32", 22, 22)


def test_the_table_refuses_only_the_replicas_engine_port_and_never_ssh() -> None:
    script = rules_script(5, SEAT, [SSH, GATEWAY])

    assert script.startswith("add table inet orch_replica_5\ndelete table inet orch_replica_5\n")
    rejects = [line.strip() for line in script.splitlines() if "reject" in line]
    assert rejects == [
        'tcp dport 8101 reject with tcp reset comment "orchestrator: default deny"',
        'fib daddr type local tcp dport 8101 reject with tcp reset comment "orchestrator: default deny"',
    ]
    assert script.count("ip saddr 10.0.0.1/32 tcp dport 8101-8101 accept") == 2
    assert script.count("ip saddr 10.0.0.2/32 tcp dport 22-22 accept") == 2  # kept, so drift reads the whole set


def test_the_engine_port_is_refused_before_dockers_dnat_too() -> None:
    """`docker run -p PORT:8000` rewrites the port at prerouting (dstnat, -100), and the call then goes through
    `forward`, never `input`: the replica's table meets it first, on prerouting at -150."""
    script = rules_script(5, SEAT, [GATEWAY])
    assert "chain ingress { type filter hook input priority 0; policy accept;" in script
    assert "chain ingress_dnat { type filter hook prerouting priority -150; policy accept;" in script
    dnat = script.split("chain ingress_dnat")[1].split("}")[0].splitlines()
    assert [line.strip().split(" comment")[0] for line in dnat[1:] if line.strip()] == [
        "ip saddr 10.0.0.1/32 tcp dport 8101-8101 accept",
        "fib daddr type local tcp dport 8101 reject with tcp reset",
    ]


def listing(*comments: str) -> str:
    rules = [{"rule": {"comment": c}} for c in comments]
    return json.dumps({"nftables": [{"metainfo": {}}, {"table": {"name": "orch_replica_5"}}, *rules]})


def test_the_table_reads_back_as_the_rules_it_was_written_from() -> None:
    comments = [
        "orchestrator: ingress tcp IPv4 10.0.0.2/32 22 22",
        "orchestrator: ingress tcp IPv4 10.0.0.1/32 8101 8101",
        "orchestrator: default deny",
    ]
    assert read_rules(listing(*comments, *comments)) == {SSH, GATEWAY}  # each chain holds the set and a reject
    assert OPEN_TO_ALL in read_rules(listing(*comments))  # one chain's (a table written before prerouting's)


def test_a_table_without_its_reject_or_with_a_foreign_rule_reads_as_open() -> None:
    assert OPEN_TO_ALL in read_rules(listing("orchestrator: ingress tcp IPv4 10.0.0.1/32 8101 8101"))
    assert OPEN_TO_ALL in read_rules(listing("someone's rule", "orchestrator: default deny"))


def test_the_inventory_finds_each_replicas_key_directory_unit_and_table() -> None:
    out = "\n".join(
        [
            "admin@laptop",
            "orchestrator-replica-3",
            "replica-4",
            "lost+found",
            "orchestrator-engine-r5.service",
            "ssh.service",
            "table inet orch_replica_6",
            "table inet filter",
            "orchestrator-replica-12x",
            "orchestrator-engine-r7",  # a container (`docker ps -a`)
            "orchestrator-engine-r8x",
        ]
    )
    assert inventory_ids(out) == {3, 4, 5, 6, 7}
    assert "docker ps -a --format '{{.Names}}'" in INVENTORY


def test_removing_a_replica_removes_its_container_too() -> None:
    """systemd stops only the `docker run` client: an engine that hangs keeps its container running."""
    script = removal(5)
    assert "docker rm -f orchestrator-engine-r5 " in script
    assert script.index("systemctl disable --now") < script.index("docker rm -f") < script.index("rm -rf")


def _pem(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, fmt: serialization.PrivateFormat, password: bytes = b""
) -> str:
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, fmt, encryption).decode()


def test_an_admins_key_may_be_ed25519_ecdsa_or_rsa_in_openssh_or_pem_but_not_encrypted() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    assert private_key(generate_keypair()[0]).get_name() == "ssh-ed25519"
    assert private_key(_pem(rsa_key, serialization.PrivateFormat.TraditionalOpenSSL)).get_name() == "ssh-rsa"
    assert private_key(_pem(rsa_key, serialization.PrivateFormat.OpenSSH)).get_name() == "ssh-rsa"
    assert private_key(_pem(ec_key, serialization.PrivateFormat.TraditionalOpenSSL)).get_name().startswith("ecdsa")
    with pytest.raises(BackendError, match="not an unencrypted"):
        private_key(_pem(rsa_key, serialization.PrivateFormat.OpenSSH, b"passphrase"))
    with pytest.raises(BackendError, match="not an unencrypted"):
        private_key("ssh-ed25519 AAAA a public line")
