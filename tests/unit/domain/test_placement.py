"""Placement on registered hosts: GPUs needed, best fit, ports, and why nothing fits."""

from __future__ import annotations

from collections.abc import Iterable

from orchestrator.domain.placement import HostRoom, Spot, gpus_needed, pick, why_not

PORTS = range(8100, 8104)


def room(
    host_id: int, name: str, gpus: int, used: Iterable[int] = (), ports: Iterable[int] = (), *, ssh_port: int = 22
) -> HostRoom:
    return HostRoom(host_id, name, gpus, frozenset(used), frozenset(ports), ssh_port)


def test_gpus_needed_follows_tensor_parallelism_then_the_flavor() -> None:
    assert gpus_needed("n3-RTX-A6000x2", 4) == 4
    assert gpus_needed("n3-RTX-A6000x2", None) == 2
    assert gpus_needed("n3-H100x8", None) == 8
    assert gpus_needed("gpu-small", None) == 1
    assert gpus_needed(None, None) == 1


def test_the_best_fitting_host_gets_it_with_its_lowest_free_gpus_and_port() -> None:
    hosts = [room(1, "big", 8, {0}), room(2, "small", 2, {1}, {8100}), room(3, "full", 2, {0, 1})]
    assert pick(hosts, 1, PORTS) == Spot(2, "small", (0,), 8101)
    assert pick(hosts, 2, PORTS) == Spot(1, "big", (1, 2), 8100)


def test_a_host_without_free_ports_or_gpus_is_passed_over() -> None:
    no_ports = room(1, "a", 4, ports=set(PORTS))
    assert pick([no_ports], 1, PORTS) is None
    assert pick([no_ports, room(2, "b", 1)], 1, PORTS) == Spot(2, "b", (0,), 8100)
    assert pick([room(1, "a", 2, {0})], 2, PORTS) is None


def test_a_hosts_own_ssh_port_is_never_an_engine_port() -> None:
    """The replica's table rejects its engine port: given the host's SSH port, it would lock the host's SSH."""
    assert pick([room(1, "a", 2, ssh_port=8100)], 1, PORTS) == Spot(1, "a", (0,), 8101)
    assert pick([room(1, "a", 2, ports={8101, 8102, 8103}, ssh_port=8100)], 1, PORTS) is None


def test_a_replica_needing_no_gpu_still_needs_a_port() -> None:
    assert pick([room(1, "cpu", 0)], 0, PORTS) == Spot(1, "cpu", (), 8100)


def test_ties_go_to_the_name_so_placement_is_repeatable() -> None:
    assert pick([room(2, "b", 2), room(1, "a", 2)], 1, PORTS) == Spot(1, "a", (0,), 8100)


def test_why_not_names_the_pool_and_each_hosts_room() -> None:
    assert why_not("rack-1", [], 1, PORTS) == "no enabled host is registered in pool 'rack-1'"
    message = why_not("rack-1", [room(1, "a", 2, {0, 1}), room(2, "b", 2, ports=set(PORTS))], 2, PORTS)
    assert "no host of pool 'rack-1' has 2 free GPUs" in message
    assert "a: 0 of 2 GPUs free" in message
    assert "b: 2 of 2 GPUs free, no free engine port in 8100-8103" in message
