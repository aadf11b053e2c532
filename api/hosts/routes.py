"""`/api/v1/hosts` (admin key): register a GPU server, list them with what is placed on each, delete one."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Router, delete, get, post, put
from litestar.di import NamedDependency
from litestar.params import JSONBody, Parameter
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT

from api.deps import SERVICES
from api.hosts import schemas as s
from api.toolkit.auth import admin_only
from api.toolkit.errors import HANDLERS
from api.toolkit.schemas import MAX_ID
from orchestrator.fleet.hosts import HostService

HostId = Annotated[int, Parameter(ge=1, le=MAX_ID)]


class HostController(Controller):
    path = "/hosts"
    tags = ["hosts"]

    @post("/", status_code=HTTP_201_CREATED)
    async def register(self, hosts: NamedDependency[HostService], data: JSONBody[s.HostIn]) -> s.HostOut:
        """Register a GPU server as a host of a pool: every field is checked (the key and the host key must
        parse); 409 when the name is taken. Nothing is sent to the server until a replica is placed on it."""
        return s.HostOut.of(await hosts.register(data.spec()))

    @get("/")
    async def list_hosts(self, hosts: NamedDependency[HostService]) -> list[s.HostOut]:
        """Every host with its GPUs in use and the replicas placed on it (no key material)."""
        return [s.HostOut.of(h) for h in await hosts.list()]

    @put("/{host_id:int}")
    async def update(
        self, hosts: NamedDependency[HostService], host_id: HostId, data: JSONBody[s.HostUpdateIn]
    ) -> s.HostOut:
        """Disable a host (no new replica is placed on it; those on it stay) or enable it again."""
        return s.HostOut.of(await hosts.set_disabled(host_id, disabled=data.disabled))

    @delete("/{host_id:int}", status_code=HTTP_204_NO_CONTENT)
    async def remove(self, hosts: NamedDependency[HostService], host_id: HostId) -> None:
        """Forget a host; 409 while a replica that is not TERMINATED is placed on it."""
        await hosts.delete(host_id)


def hosts_router() -> Router:
    return Router(
        path="/api/v1",
        route_handlers=[HostController],
        guards=[admin_only],
        dependencies=SERVICES,
        exception_handlers=dict(HANDLERS),
    )
