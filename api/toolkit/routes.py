"""The toolkit's admin routes: parse -> call the domain -> shape the answer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from litestar import Controller, Response, Router, delete, get, post, put
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody, Parameter
from litestar.status_codes import HTTP_200_OK, HTTP_204_NO_CONTENT, HTTP_400_BAD_REQUEST, HTTP_409_CONFLICT

from api.deps import SERVICES
from api.toolkit import schemas as s
from api.toolkit.auth import admin_only
from api.toolkit.deployments import DeploymentController
from api.toolkit.errors import HANDLERS
from orchestrator.billing.api_keys import ApiKeyService
from orchestrator.domain.engine_spec import EngineSpec
from orchestrator.domain.errors import Conflict, NotFound
from orchestrator.domain.lifecycle import ReplicaStatus, vm_status
from orchestrator.fleet.models import ModelService
from orchestrator.fleet.replicas import ReplicaService
from orchestrator.fleet.ssh_access import BOOTSTRAP_EVENT
from orchestrator.store.api_keys import KeyRemoval
from orchestrator.store.fleet import ReplicaDetail
from orchestrator.store.tables import Replica, ReplicaEvent, row_id
from orchestrator.surfaces.toolkit.tables import TableService

# Ids outside the column's range are refused with a 400 rather than reaching the database.
PathId = Annotated[int, Parameter(ge=1, le=s.MAX_ID)]

_PROBED_FOR_READINESS = frozenset({ReplicaStatus.STARTING, ReplicaStatus.UNHEALTHY})

_KEY_MESSAGES = {
    KeyRemoval.DELETED: "API key deleted successfully",
    KeyRemoval.DISABLED: "API key disabled successfully",
}


class ApiKeyController(Controller):
    dependencies = SERVICES
    tags = ["api keys"]

    @post("/generate_api_key", status_code=HTTP_200_OK)
    async def generate(
        self, api_keys: NamedDependency[ApiKeyService], data: JSONBody[s.GenerateApiKeyIn]
    ) -> s.IssuedKeyOut:
        issued = await api_keys.issue(
            data.user_id, allowed_rpm=data.allowed_rpm, name=data.name, allowed_ips=",".join(data.allowed_ips)
        )
        return s.IssuedKeyOut(api_key=issued.api_key, id=issued.id, enabled=issued.enabled)

    @post("/delete_api_key", status_code=HTTP_200_OK)
    async def remove(
        self, api_keys: NamedDependency[ApiKeyService], data: JSONBody[s.DeleteApiKeyIn]
    ) -> Response[s.MessageOut]:
        try:
            outcome = await api_keys.remove(data.user_id, data.api_key_id)
        except Conflict as e:
            return Response(s.MessageOut(message=str(e)), status_code=HTTP_409_CONFLICT)
        return Response(s.MessageOut(message=_KEY_MESSAGES[outcome]))


class TableController(Controller):
    dependencies = SERVICES
    path = "/tables"
    tags = ["tables"]

    @get("/")
    async def names(self, tables: NamedDependency[TableService]) -> s.TablesOut:
        return s.TablesOut(tables=tables.names())

    @get("/{table_name:str}")
    async def rows(self, tables: NamedDependency[TableService], table_name: FromPath[str]) -> s.TableDataOut:
        return s.TableDataOut(data=await tables.rows(table_name))


class ModelController(Controller):
    dependencies = SERVICES
    path = "/models"
    tags = ["models"]

    @get("/")
    async def list_models(
        self, models: NamedDependency[ModelService], active: FromQuery[str | None] = None
    ) -> list[s.ModelOut]:
        found = await models.list(active_only=bool(active) and active not in ("0", "false"))
        return [s.ModelOut(id=row_id(m.id), name=m.name) for m in found]

    @get("/{model_name:str}")
    async def get_model(self, models: NamedDependency[ModelService], model_name: FromPath[str]) -> s.ModelOut:
        if "\x00" in model_name:  # no name holds one (they are refused), and PostgreSQL cannot compare one
            raise NotFound("Model not found")
        model = await models.get(model_name)
        return s.ModelOut(id=row_id(model.id), name=model.name)

    @post("/")
    async def create_model(self, models: NamedDependency[ModelService], data: JSONBody[s.ModelIn]) -> Response[Any]:
        try:
            model = await models.create(data.name)
        except Conflict as e:
            return Response(s.MessageOut(message=str(e)), status_code=HTTP_400_BAD_REQUEST)
        return Response(s.ModelCreatedOut(model_name=model.name, id=row_id(model.id)), status_code=201)

    @delete("/{model_id:int}", status_code=HTTP_204_NO_CONTENT)
    async def delete_model(self, models: NamedDependency[ModelService], model_id: PathId) -> None:
        await models.delete(model_id)

    @get("/{model_id:int}/replicas")
    async def list_replicas(self, replicas: NamedDependency[ReplicaService], model_id: PathId) -> list[s.ReplicaOut]:
        return [_replica_out(r) for r in await replicas.list(model_id)]

    @post("/{model_id:int}/replicas")
    async def create_replica(
        self, replicas: NamedDependency[ReplicaService], model_id: PathId, data: JSONBody[s.ReplicaIn]
    ) -> Response[Any]:
        try:
            replica_id = await replicas.create(model_id, data.spec())
        except Conflict as e:
            return Response({"error": str(e)}, status_code=HTTP_400_BAD_REQUEST)
        return Response(s.ReplicaCreatedOut(replica_id=replica_id), status_code=201)

    @put("/replicas/{replica_id:int}", status_code=HTTP_204_NO_CONTENT)
    async def update_replica(
        self, replicas: NamedDependency[ReplicaService], replica_id: PathId, data: JSONBody[s.ReplicaUpdateIn]
    ) -> None:
        await replicas.set_rate_limit(replica_id, data.rate_limit)


class ReplicaController(Controller):
    dependencies = SERVICES
    path = "/replicas"
    tags = ["replicas"]

    @get("/{replica_id:int}")
    async def detail(self, replicas: NamedDependency[ReplicaService], replica_id: PathId) -> s.ReplicaDetailOut:
        return _detail_out(await replicas.detail(replica_id))

    @delete("/{replica_id:int}", status_code=HTTP_204_NO_CONTENT)
    async def remove(self, replicas: NamedDependency[ReplicaService], replica_id: PathId) -> None:
        await replicas.delete(replica_id)


def _replica_out(r: Replica) -> s.ReplicaOut:
    return s.ReplicaOut(
        id=row_id(r.id),
        model_id=r.model_id,
        endpoint=r.endpoint,
        rate_limit=r.rate_limit,
        flavor_name=r.flavor_name,
        vm_status=vm_status(ReplicaStatus(r.status), r.termination_reason),
        name=r.name,
        environment_name=r.environment_name,
        image_name=r.image_name,
        assign_floating_ip=r.assign_floating_ip,
        run_command=r.run_command,
        key_name=r.key_name,
        vm_id=r.vm_id,
        error_message=_error_message(r),
        status=r.status,
        create_vm=r.create_vm,
    )


def _error_message(r: Replica) -> str | None:
    """Why the replica failed, or, while it is not ready, what its probes find wrong, or, while PENDING, why it
    waits (the toolkit's UI shows this field only)."""
    if r.error_message or not r.probe_error:
        return r.error_message
    if r.status == ReplicaStatus.PENDING:  # why it waits (for a host with room, on `hosts`)
        return r.probe_error
    if r.status not in _PROBED_FOR_READINESS:
        return r.error_message
    return f"not ready: {r.probe_error}"


def _detail_out(d: ReplicaDetail) -> s.ReplicaDetailOut:
    r = d.replica
    return s.ReplicaDetailOut(
        **_replica_out(r).model_dump(),
        model_name=d.model_name,
        port=r.port,
        vm_address=r.vm_address,
        ssh_port=r.ssh_port,
        host_key=r.host_key,
        recoveries=r.recoveries,
        status_changed_at=r.status_changed_at,
        termination_reason=r.termination_reason,
        created_at=r.created_at,
        deleted=r.delete_requested_at is not None,
        engine=s.EngineOut.of(EngineSpec.from_json(r.engine_spec)) if r.engine_spec else None,
        bootstrap=_bootstrap_steps(d.events),
        engine_log=r.engine_log,
        probe_error=r.probe_error,
        probe_error_since=r.probe_error_since,
        ready_deadline=r.ready_deadline,
        security_rules=[s.SecurityRuleOut.model_validate(rule, from_attributes=True) for rule in d.rules],
        events=[s.EventOut.model_validate(e, from_attributes=True) for e in d.events],
    )


def _bootstrap_steps(events: Sequence[ReplicaEvent]) -> list[s.BootstrapStepOut]:
    """The latest run's steps: each step's last event (a rerun after a crash replaces the earlier outcome)."""
    steps: dict[str, s.BootstrapStepOut] = {}
    for e in events:
        step = e.reason.removeprefix(BOOTSTRAP_EVENT)
        if step not in {e.reason, "failed"}:  # a bootstrap step, not the failure that ended one
            outcome = "unchanged" if (e.message or "").startswith("unchanged") else "changed"
            steps[step] = s.BootstrapStepOut(step=step, outcome=outcome, at=e.at)
    return list(steps.values())


def toolkit_router() -> Router:
    return Router(
        path="/api/v1",
        route_handlers=[ApiKeyController, TableController, ModelController, ReplicaController, DeploymentController],
        guards=[admin_only],
        exception_handlers=dict(HANDLERS),
    )
