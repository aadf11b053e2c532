"""Registered hosts: the admin's GPU servers (`HostService`), and replicas placed on them (`HostPlacer`).

The placer is the `hosts` backend's link to the database: it records each replica's placement (a host of the
replica's pool, the replica's `environment_name`, with enough free GPUs and a free engine port) and keeps the
backend's `HostBook` current, since the backend's methods run in worker threads and take replica ids only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from dataclasses import dataclass, field

import structlog

from infra.hosts import HostBook, HostLogin, Seat, private_key, public_key
from infra.vm import BackendError
from orchestrator.domain.engine_spec import EngineSpec
from orchestrator.domain.errors import InvalidInput, NotFound
from orchestrator.domain.placement import Spot, gpus_needed
from orchestrator.platform.secrets import SecretBox
from orchestrator.store.hosts import HostStore, HostUse
from orchestrator.store.tables import Host, Replica, row_id

log = structlog.get_logger(__name__)

_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62})")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)
MAX_GPUS = 64
MAX_PORT = 65535


@dataclass(frozen=True)
class HostSpec:
    """What an admin registers."""

    name: str
    pool: str
    address: str
    ssh_user: str
    ssh_private_key: str = field(repr=False)
    host_key: str
    gpus: int
    ssh_port: int = 22


def check(spec: HostSpec, engine_ports: range) -> None:
    """InvalidInput naming the first field that is wrong (the key's material is never quoted)."""
    if not _NAME.fullmatch(spec.name):
        raise InvalidInput("name", "1-63 lower-case letters, digits and '-', starting with a letter or digit")
    if not spec.pool.strip() or len(spec.pool) > 255:
        raise InvalidInput("pool", "a pool name of 1-255 characters (replicas name it as environment_name)")
    if not _address(spec.address):
        raise InvalidInput("address", "an IPv4 or IPv6 address or a DNS name")
    if not 0 < spec.ssh_port <= MAX_PORT:
        raise InvalidInput("ssh_port", f"a TCP port, 1-{MAX_PORT}")
    if spec.ssh_port in engine_ports:
        raise InvalidInput(
            "ssh_port",
            f"a port outside the engine ports {engine_ports.start}-{engine_ports.stop - 1} (ORCH_HOST_PORT_MIN and"
            " _MAX): a replica's rules refuse its engine port to all but the gateway",
        )
    if not _USER.fullmatch(spec.ssh_user):
        raise InvalidInput("ssh_user", "a login name: lower-case letters, digits, '_' and '-', up to 32")
    if spec.ssh_user == "root":
        raise InvalidInput("ssh_user", "a login other than root, with passwordless sudo (as a cloud image's)")
    try:
        private_key(spec.ssh_private_key)
    except BackendError as e:
        raise InvalidInput("ssh_private_key", str(e)) from None
    try:
        public_key(spec.host_key)
    except BackendError as e:
        raise InvalidInput("host_key", f"{e} (e.g. the line of /etc/ssh/ssh_host_ed25519_key.pub)") from None
    if not 0 <= spec.gpus <= MAX_GPUS:
        raise InvalidInput("gpus", f"how many GPUs replicas may use, 0-{MAX_GPUS}")


def _address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return bool(_HOSTNAME.fullmatch(text)) and not text.replace(".", "").isdigit()
    return True


class HostService:
    def __init__(self, store: HostStore, box: SecretBox, placer: HostPlacer | None, engine_ports: range) -> None:
        self._store = store
        self._box = box
        self._placer = placer
        self._engine_ports = engine_ports
        """ORCH_HOST_PORT_MIN..MAX, the ports placement gives engines (checked on any backend: it may change)."""

    async def register(self, spec: HostSpec) -> HostUse:
        check(spec, self._engine_ports)
        host = await self._store.add(
            Host(
                name=spec.name,
                pool=spec.pool,
                address=spec.address,
                ssh_port=spec.ssh_port,
                ssh_user=spec.ssh_user,
                ssh_key_sealed=self._box.seal(spec.ssh_private_key),
                host_key=" ".join(spec.host_key.split()[:2]),
                gpus=spec.gpus,
            )
        )
        log.info("host.registered", host=host.name, pool=host.pool, gpus=host.gpus)
        await self._changed()
        return HostUse(host, ())

    async def list(self) -> list[HostUse]:
        return await self._store.hosts()

    async def set_disabled(self, host_id: int, *, disabled: bool) -> HostUse:
        use = await self._store.set_disabled(host_id, disabled)
        log.info("host.disabled" if disabled else "host.enabled", host=use.host.name)
        await self._changed()
        return use

    async def delete(self, host_id: int) -> None:
        await self._store.delete(host_id)
        log.info("host.deleted", host_id=host_id)
        await self._changed()

    async def _changed(self) -> None:
        if self._placer is not None:
            await self._placer.refresh()


class HostPlacer:
    """Places replicas on hosts (one at a time, so two never take the same GPUs) and keeps `book` current."""

    def __init__(self, store: HostStore, box: SecretBox, book: HostBook, ports: range) -> None:
        self._store = store
        self._box = box
        self.book = book
        self.ports = ports
        self._lock = asyncio.Lock()

    async def place(self, replica: Replica) -> Spot | str:
        """The replica's spot (kept if it has one), or why no host of its pool has room now."""
        spec = EngineSpec.from_json(replica.engine_spec) if replica.engine_spec else None
        need = gpus_needed(replica.flavor_name, spec.tensor_parallel_size if spec else None)
        pool = replica.environment_name or ""
        async with self._lock:
            spot = await self._store.place(row_id(replica.id), pool, need, self.ports)
        if not isinstance(spot, str):
            await self.refresh()
        return spot

    async def host_key(self, replica_id: int) -> str:
        """The pinned key of the host the replica is placed on (the key its bootstrap pins)."""
        placed = await self._store.placement(replica_id)
        if placed is None:
            raise NotFound(f"replica {replica_id} is placed on no host")
        return placed[1].host_key

    async def refresh(self) -> None:
        """Read the hosts and live placements into the book the backend reads."""
        hosts = await self._store.hosts()
        logins: list[HostLogin] = []
        seats: dict[int, Seat] = {}
        for use in hosts:
            host = use.host
            login = HostLogin(
                name=host.name,
                address=host.address,
                ssh_port=host.ssh_port,
                ssh_user=host.ssh_user,
                ssh_private_key=self._box.open(host.ssh_key_sealed),
                host_public_key=host.host_key,
            )
            logins.append(login)
            for placed in use.placed:
                seats[placed.replica_id] = Seat(login, placed.gpus, placed.engine_port)
        self.book.replace(logins, seats)
