"""Placing a replica on a registered host: how many GPUs it needs, and which host, GPUs and engine port it gets.

Pure: the store reads each host's room (its GPUs and what its live placements hold) and records what `pick`
chose, in one transaction. Best fit: the host with the fewest free GPUs that still fits, so a large replica
later finds a host with room; ties go to the name, so the same fleet always places the same way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_FLAVOR_GPUS = re.compile(r"x(\d+)$")
"""A flavor ending in `x<count>` (Hyperstack's `n3-RTX-A6000x2`) names its GPU count."""


@dataclass(frozen=True)
class HostRoom:
    """One host as placement sees it."""

    host_id: int
    name: str
    gpus: int
    used_gpus: frozenset[int]
    used_ports: frozenset[int]
    ssh_port: int = 22
    """The host's own SSH: never an engine port, since a replica's table rejects its engine port to strangers."""

    @property
    def free_gpus(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.gpus) if i not in self.used_gpus)


@dataclass(frozen=True)
class Spot:
    """Where a replica goes: a host, the GPU indices it may use, and the port its engine listens on."""

    host_id: int
    host_name: str
    gpus: tuple[int, ...]
    engine_port: int


def gpus_needed(flavor_name: str | None, tensor_parallel_size: int | None) -> int:
    """The engine spec's tensor parallel size, else the flavor's `x<count>`, else one GPU."""
    if tensor_parallel_size:
        return tensor_parallel_size
    found = _FLAVOR_GPUS.search(flavor_name or "")
    return int(found.group(1)) if found else 1


def pick(hosts: Sequence[HostRoom], need: int, ports: range) -> Spot | None:
    """The best-fitting host with `need` free GPUs and a free port in `ports`, or None when none has both.
    The lowest free GPU indices and the lowest free port are taken."""
    fitting = [h for h in hosts if len(h.free_gpus) >= need and _free_port(h, ports) is not None]
    if not fitting:
        return None
    best = min(fitting, key=lambda h: (len(h.free_gpus), h.name))
    port = _free_port(best, ports)
    assert port is not None
    return Spot(best.host_id, best.name, best.free_gpus[:need], port)


def why_not(pool: str, hosts: Sequence[HostRoom], need: int, ports: range) -> str:
    """Why `pick` found nothing, for the waiting replica's event and error message."""
    if not hosts:
        return f"no enabled host is registered in pool {pool!r}"
    rooms = ", ".join(
        f"{h.name}: {len(h.free_gpus)} of {h.gpus} GPUs free"
        + ("" if _free_port(h, ports) is not None else f", no free engine port in {ports.start}-{ports.stop - 1}")
        for h in sorted(hosts, key=lambda h: h.name)
    )
    return f"waiting for room: no host of pool {pool!r} has {need} free GPU{'s' if need != 1 else ''} ({rooms})"


def _free_port(host: HostRoom, ports: range) -> int | None:
    return next((p for p in ports if p not in host.used_ports and p != host.ssh_port), None)
