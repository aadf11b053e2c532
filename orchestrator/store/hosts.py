"""SQL of registered hosts and of the replicas placed on them. One method is one transaction.

A placement holds its host's GPUs and engine port while its replica is not TERMINATED; the placement of a
terminated replica counts for nothing and is deleted by the next placement (or the host's deletion), so a
replica is released by the very move that terminates it, with no second write to forget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from orchestrator.domain.errors import Conflict, NotFound
from orchestrator.domain.lifecycle import ReplicaStatus
from orchestrator.domain.placement import HostRoom, Spot, pick, why_not
from orchestrator.store.tables import Host, HostPlacement, Replica, row_id


@dataclass(frozen=True)
class Placed:
    """A live placement with its replica's status (for listings and the backend's book)."""

    replica_id: int
    status: str
    gpus: tuple[int, ...]
    engine_port: int


@dataclass(frozen=True)
class HostUse:
    host: Host
    placed: tuple[Placed, ...]


def gpu_list(text: str) -> tuple[int, ...]:
    return tuple(int(i) for i in text.split(",") if i)


class HostStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def add(self, host: Host) -> Host:
        async with self._sessions() as s:
            s.add(host)
            try:
                await s.commit()
            except IntegrityError as e:
                raise Conflict(f"a host named {host.name!r} is already registered") from e
            await s.refresh(host)
            return host

    async def hosts(self) -> list[HostUse]:
        """Every host with the live placements on it, by name."""
        async with self._sessions() as s:
            hosts = (await s.exec(select(Host).order_by(col(Host.name)))).all()
            placed = await _live(s, [row_id(h.id) for h in hosts])
        return [HostUse(h, placed.get(row_id(h.id), ())) for h in hosts]

    async def set_disabled(self, host_id: int, disabled: bool) -> HostUse:
        """A disabled host takes no new replica; those on it stay."""
        async with self._sessions() as s:
            host = await s.get(Host, host_id)
            if host is None:
                raise NotFound(f"host {host_id} does not exist")
            host.disabled = disabled
            s.add(host)
            await s.commit()
            await s.refresh(host)
            placed = (await _live(s, [host_id])).get(host_id, ())
            return HostUse(host, placed)

    async def delete(self, host_id: int) -> None:
        """Removes the host; Conflict while a live replica is placed on it."""
        async with self._sessions() as s:
            host = await s.get(Host, host_id)
            if host is None:
                raise NotFound(f"host {host_id} does not exist")
            placed = (await _live(s, [host_id])).get(host_id, ())
            if placed:
                ids = ", ".join(str(p.replica_id) for p in placed)
                raise Conflict(f"host {host.name!r} still holds replicas {ids}: delete them first")
            await s.exec(delete(HostPlacement).where(col(HostPlacement.host_id) == host_id))
            await s.delete(host)
            await s.commit()

    async def placement(self, replica_id: int) -> tuple[HostPlacement, Host] | None:
        async with self._sessions() as s:
            return await _placement(s, replica_id)

    async def place(self, replica_id: int, pool: str, need: int, ports: range) -> Spot | str:
        """The replica's placement: the one it has, or a new one on a host of `pool` with `need` free GPUs and a
        free port, recorded. A string says why no host has room. The caller serialises placements (the leader's
        one placer), and the port's unique constraint catches any other race."""
        async with self._sessions() as s:
            existing = await _placement(s, replica_id)
            if existing is not None:
                placement, host = existing
                return Spot(row_id(host.id), host.name, gpu_list(placement.gpus), placement.engine_port)
            hosts = (await s.exec(select(Host).where(col(Host.pool) == pool, col(Host.disabled).is_(False)))).all()
            await _forget_terminated(s, [row_id(h.id) for h in hosts])
            placed = await _live(s, [row_id(h.id) for h in hosts])
            rooms = [_room(h, placed.get(row_id(h.id), ())) for h in hosts]
            spot = pick(rooms, need, ports)
            if spot is None:
                return why_not(pool, rooms, need, ports)
            s.add(
                HostPlacement(
                    replica_id=replica_id,
                    host_id=spot.host_id,
                    gpus=",".join(map(str, spot.gpus)),
                    engine_port=spot.engine_port,
                )
            )
            try:
                await s.commit()
            except IntegrityError as e:
                raise Conflict(f"host {spot.host_name}'s port {spot.engine_port} was taken meanwhile") from e
            return spot


def _room(host: Host, placed: Sequence[Placed]) -> HostRoom:
    return HostRoom(
        host_id=row_id(host.id),
        name=host.name,
        gpus=host.gpus,
        used_gpus=frozenset(g for p in placed for g in p.gpus),
        used_ports=frozenset(p.engine_port for p in placed),
        ssh_port=host.ssh_port,
    )


async def _placement(s: AsyncSession, replica_id: int) -> tuple[HostPlacement, Host] | None:
    query = (
        select(HostPlacement, Host)
        .join(Host, col(Host.id) == col(HostPlacement.host_id))
        .where(col(HostPlacement.replica_id) == replica_id)
    )
    row = (await s.exec(query)).first()
    return None if row is None else (row[0], row[1])


async def _live(s: AsyncSession, host_ids: Sequence[int]) -> dict[int, tuple[Placed, ...]]:
    query = (
        select(HostPlacement, col(Replica.status))
        .join(Replica, col(Replica.id) == col(HostPlacement.replica_id))
        .where(col(HostPlacement.host_id).in_(host_ids), col(Replica.status) != ReplicaStatus.TERMINATED)
        .order_by(col(HostPlacement.replica_id))
    )
    found: dict[int, list[Placed]] = {}
    for placement, status in (await s.exec(query)).all():
        found.setdefault(placement.host_id, []).append(
            Placed(placement.replica_id, status, gpu_list(placement.gpus), placement.engine_port)
        )
    return {host_id: tuple(p) for host_id, p in found.items()}


async def _forget_terminated(s: AsyncSession, host_ids: Sequence[int]) -> None:
    terminated = select(col(Replica.id)).where(col(Replica.status) == ReplicaStatus.TERMINATED)
    await s.exec(
        delete(HostPlacement).where(
            col(HostPlacement.host_id).in_(host_ids), col(HostPlacement.replica_id).in_(terminated)
        )
    )
