"""Bodies of `/api/v1/hosts`. Unknown fields are refused; the private key goes in and never comes out."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, Field

from api.toolkit.schemas import _In  # the toolkit's base: unknown fields and NUL refused
from orchestrator.fleet.hosts import MAX_GPUS, HostSpec
from orchestrator.store.hosts import HostUse
from orchestrator.store.tables import row_id


class HostIn(_In):
    name: Annotated[str, Field(min_length=1, max_length=63)]
    """Unique: lower-case letters, digits and '-'."""
    pool: Annotated[str, Field(min_length=1, max_length=255)]
    """Replicas whose `environment_name` is this pool are placed on the pool's hosts."""
    address: Annotated[str, Field(min_length=1, max_length=255)]
    """An IP address or a DNS name the orchestrator reaches the server at (SSH and the engines' ports)."""
    ssh_port: Annotated[int, Field(ge=1, le=65535)] = 22
    ssh_user: Annotated[str, Field(min_length=1, max_length=32)]
    """A login other than root with passwordless sudo."""
    ssh_private_key: Annotated[str, Field(min_length=1, max_length=16384)]
    """The login's private key, unencrypted OpenSSH or PEM (Ed25519, ECDSA, RSA); stored encrypted, never shown."""
    host_key: Annotated[str, Field(min_length=1, max_length=16384)]
    """The server's SSH host key as an OpenSSH public line (`/etc/ssh/ssh_host_ed25519_key.pub`), pinned."""
    gpus: Annotated[int, Field(ge=0, le=MAX_GPUS)]
    """How many of its GPUs (indices 0 .. gpus-1) replicas may be given."""

    def spec(self) -> HostSpec:
        return HostSpec(
            name=self.name,
            pool=self.pool,
            address=self.address,
            ssh_port=self.ssh_port,
            ssh_user=self.ssh_user,
            ssh_private_key=self.ssh_private_key,
            host_key=self.host_key,
            gpus=self.gpus,
        )


class HostUpdateIn(_In):
    disabled: bool
    """True: no new replica is placed on the host (those on it stay); false: it takes replicas again."""


class PlacedOut(BaseModel):
    replica_id: int
    status: str
    gpus: list[int]
    engine_port: int


class HostOut(BaseModel):
    """A registered host; its key is never part of it."""

    id: int
    name: str
    pool: str
    address: str
    ssh_port: int
    ssh_user: str
    host_key: str
    """The pinned host key (public)."""
    gpus: int
    gpus_used: int
    disabled: bool
    created_at: datetime
    replicas: list[PlacedOut]
    """The replicas placed on it that are not TERMINATED."""

    @classmethod
    def of(cls, use: HostUse) -> HostOut:
        h = use.host
        return cls(
            id=row_id(h.id),
            name=h.name,
            pool=h.pool,
            address=h.address,
            ssh_port=h.ssh_port,
            ssh_user=h.ssh_user,
            host_key=h.host_key,
            gpus=h.gpus,
            gpus_used=sum(len(p.gpus) for p in use.placed),
            disabled=h.disabled,
            created_at=h.created_at,
            replicas=[
                PlacedOut(replica_id=p.replica_id, status=p.status, gpus=list(p.gpus), engine_port=p.engine_port)
                for p in use.placed
            ],
        )
