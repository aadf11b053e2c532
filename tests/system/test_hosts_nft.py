"""A replica's nft table on a host whose engine runs in a container published with `docker run -p PORT:8000`:
the call is rewritten at prerouting and forwarded, never reaching `input`, and the table still refuses a stranger.

Real: two network namespaces on veths (the host, and a container behind it), the kernel's forwarding, an nft
DNAT rule written as docker writes its own (prerouting at dstnat, to local addresses only), the table the backend
writes, and a listener in the container. The machine stand-in has no docker, so this is where its path is tried.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from infra.hosts import HostLogin, Seat, read_rules, rules_script
from infra.vm import Rule
from tests.support.sandbox import connects

NET = f"h1{os.getpid() % 100000}"
"""Names of this run's namespaces and links (a link name is at most 15 characters)."""
HOST_NS, BOX_NS = f"{NET}h", f"{NET}c"
HOST, GATEWAY, STRANGER = "10.215.0.2", "10.215.0.1", "10.215.0.3"
BOX = "10.215.1.2"
PORT = 8150
SEAT = Seat(HostLogin("gpu-1", HOST, 22, "ubuntu", "unused", "ssh-ed25519 AAAA"), (0,), PORT)
DOCKER = f"""table ip docker_stand_in {{
  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept;
    fib daddr type local tcp dport {PORT} dnat to {BOX}:8000
  }}
}}
"""
"""What `docker run -p {PORT}:8000` adds (in its own table, through iptables-nft): a DNAT of the host's port."""


def sh(*args: str, stdin: str | None = None) -> None:
    subprocess.run(args, input=stdin, text=True, check=True, capture_output=True, timeout=10)


def in_host(*args: str, stdin: str | None = None) -> None:
    sh("ip", "netns", "exec", HOST_NS, *args, stdin=stdin)


@pytest.fixture
def docker_host() -> Iterator[None]:
    """The host's namespace on a veth from this one (GATEWAY and STRANGER are this side's addresses), with a
    container namespace behind it listening on 8000, and docker's DNAT of PORT to it."""
    assert os.geteuid() == 0, "network namespaces need root; CI runs as root"
    listener: subprocess.Popen[bytes] | None = None
    try:
        sh("ip", "netns", "add", HOST_NS)
        sh("ip", "netns", "add", BOX_NS)
        sh("ip", "link", "add", f"{NET}a", "type", "veth", "peer", "name", f"{NET}b", "netns", HOST_NS)
        for address in (GATEWAY, STRANGER):
            sh("ip", "addr", "add", f"{address}/24", "dev", f"{NET}a")
        sh("ip", "link", "set", f"{NET}a", "up")
        in_host("ip", "addr", "add", f"{HOST}/24", "dev", f"{NET}b")
        in_host("ip", "link", "set", f"{NET}b", "up")
        in_host("ip", "link", "add", f"{NET}d", "type", "veth", "peer", "name", f"{NET}e", "netns", BOX_NS)
        in_host("ip", "addr", "add", "10.215.1.1/24", "dev", f"{NET}d")
        in_host("ip", "link", "set", f"{NET}d", "up")
        in_host("sysctl", "-qw", "net.ipv4.ip_forward=1")
        for command in (
            ["ip", "addr", "add", f"{BOX}/24", "dev", f"{NET}e"],
            ["ip", "link", "set", f"{NET}e", "up"],
            ["ip", "link", "set", "lo", "up"],
            ["ip", "route", "add", "default", "via", "10.215.1.1"],
        ):
            sh("ip", "netns", "exec", BOX_NS, *command)
        in_host("nft", "-f", "-", stdin=DOCKER)
        serve = (
            f"import socket; s = socket.create_server(({BOX!r}, 8000)); [s.accept()[0].close() for _ in iter(int, 1)]"
        )
        listener = subprocess.Popen(["ip", "netns", "exec", BOX_NS, sys.executable, "-c", serve])
        deadline = time.monotonic() + 10
        while not connects(HOST, PORT, STRANGER):  # through the DNAT, before any table of ours
            assert time.monotonic() < deadline, "the container's listener never answered through the DNAT"
        yield
    finally:
        if listener is not None:
            listener.kill()
            listener.wait()
        subprocess.run(["ip", "link", "del", f"{NET}a"], capture_output=True, check=False)
        for ns in (HOST_NS, BOX_NS):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


@pytest.mark.usefixtures("docker_host")
def test_a_published_containers_port_is_refused_to_strangers_and_open_to_the_gateway() -> None:
    gateway = Rule("ingress", "tcp", "IPv4", f"{GATEWAY}/32", PORT, PORT)
    in_host("nft", "-f", "-", stdin=rules_script(7, SEAT, [gateway]))

    assert connects(HOST, PORT, GATEWAY)
    assert not connects(HOST, PORT, STRANGER)
    listing = subprocess.run(
        ["ip", "netns", "exec", HOST_NS, "nft", "-j", "list", "table", "inet", "orch_replica_7"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert read_rules(listing) == {gateway}  # both chains' lines, read back from the kernel, are the set
