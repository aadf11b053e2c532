"""Sandbox backends for tests: each gets its own loopback subnet, so tests never share an address or an
nft table, and everything a test's backend owns is destroyed when it ends."""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from infra.sandbox import SandboxBackend, SandboxConfig

_subnets = itertools.count()
FOREIGN = "127.0.0.99"
"""A source address neither the gateway (127.0.0.1) nor the orchestrator (127.0.0.2) uses."""


def next_subnet() -> str:
    n = next(_subnets)
    return f"127.{120 + n // 256}.{n % 256}.0/24"


@contextmanager
def sandbox_backend(root: Path, **options: object) -> Iterator[SandboxBackend]:
    backend = SandboxBackend(SandboxConfig(root=root, subnet=next_subnet(), **options))  # type: ignore[arg-type]
    try:
        yield backend
    finally:
        for replica_id in backend.owned():
            backend.destroy(replica_id)


def connects(host: str, port: int, source: str, timeout: float = 1.0) -> bool:
    """Whether a TCP connection from `source` to host:port is accepted (refused or dropped: False)."""
    with socket.socket() as s:
        s.settimeout(timeout)
        s.bind((source, 0))
        try:
            s.connect((host, port))
        except OSError:
            return False
        return True


def listening_on(address: str) -> list[str]:
    """Sockets listening on `address` (from /proc/net/tcp), as "address:port" strings."""
    return [f"{address}:{port}" for port, state in _sockets(address) if state == "0A"]


def sockets_on(address: str) -> list[str]:
    """Every TCP socket on `address` a process may still hold (TIME_WAIT has no process), as "port state"."""
    return [f"{port} {state}" for port, state in _sockets(address) if state != "06"]


def _sockets(address: str) -> list[tuple[int, str]]:
    packed = socket.inet_aton(address)[::-1].hex().upper()
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        host, port = local.split(":")
        if host == packed:
            found.append((int(port, 16), state))
    return found
