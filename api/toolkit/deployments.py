"""A model's deployment at `/api/v1/models/{model_id}/deployment`: set (PUT), read (GET), stop keeping (DELETE)."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

from litestar import Controller, delete, get, put
from litestar.di import NamedDependency
from litestar.params import JSONBody, Parameter
from litestar.status_codes import HTTP_200_OK

from api.deps import SERVICES
from api.toolkit import schemas as s
from orchestrator.domain.rollout import GONE
from orchestrator.fleet.deployments import DeploymentService, DeploymentView
from orchestrator.fleet.replicas import ReplicaSpec
from orchestrator.store.tables import row_id

PathId = Annotated[int, Parameter(ge=1, le=s.MAX_ID)]


class DeploymentController(Controller):
    path = "/models/{model_id:int}/deployment"
    tags = ["deployments"]
    # Only the service it uses: Litestar answers 500 to a body error on a field named like a dependency (it takes
    # it for the dependency's), and the body's `replicas` is also the replicas' service's name.
    dependencies = {"deployments": SERVICES["deployments"]}

    @put("/", status_code=HTTP_200_OK)
    async def set_deployment(
        self, deployments: NamedDependency[DeploymentService], model_id: PathId, data: JSONBody[s.DeploymentIn]
    ) -> s.DeploymentOut:
        """Create or replace the model's desired replicas. A changed template rolls the replicas (new ones first,
        `max_surge` at a time); the same body again retries a `failing` deployment."""
        return _out(await deployments.put(model_id, data.spec()))

    @get("/")
    async def get_deployment(
        self, deployments: NamedDependency[DeploymentService], model_id: PathId
    ) -> s.DeploymentOut:
        """The deployment, its replicas' statuses and the roll under way."""
        return _out(await deployments.get(model_id))

    @delete("/", status_code=HTTP_200_OK)
    async def delete_deployment(
        self, deployments: NamedDependency[DeploymentService], model_id: PathId
    ) -> s.DeploymentDeletedOut:
        """Stop keeping the model's replicas: each is drained (no new calls, its calls in flight end) and torn down."""
        drained = await deployments.delete(model_id)
        return s.DeploymentDeletedOut(message=f"Deployment deleted; {len(drained)} replicas draining", drained=drained)


def _out(view: DeploymentView) -> s.DeploymentOut:
    d = view.deployment
    alive = [r for r in view.replicas if r.status not in GONE]
    new = [r for r in alive if r.deployment_generation == d.generation]
    old = len(alive) - len(new)
    roll = None
    if old:
        ready = sum(1 for r in new if r.status == "READY")
        roll = s.RollOut(generation=d.generation, new=len(new), new_ready=ready, old=old)
    return s.DeploymentOut(
        id=row_id(d.id),
        model_id=d.model_id,
        template=_template_out(view.template),
        replicas=d.replicas,
        autoscale=None if view.autoscale is None else dataclasses.asdict(view.autoscale),
        desired=d.desired,
        max_surge=d.max_surge,
        generation=d.generation,
        spec_hash=d.spec_hash,
        status=d.status,
        message=d.message,
        roll=roll,
        members=[
            s.DeploymentMemberOut(
                id=row_id(r.id),
                status=r.status,
                generation=r.deployment_generation,
                termination_reason=r.termination_reason,
                created_at=r.created_at,
            )
            for r in view.replicas
        ],
        created_at=d.created_at,
        updated_at=d.updated_at,
    )


def _template_out(spec: ReplicaSpec) -> dict[str, Any]:
    """The template in the shape it was given (the replica body), secret values left out."""
    vm = spec.vm
    assert vm is not None
    details: dict[str, Any] = {
        "name": vm.name,
        "environment_name": vm.environment_name,
        "image_name": vm.image_name,
        "flavor_name": vm.flavor_name,
        "key_name": vm.key_name,
        "port": vm.port,
        "run_command": vm.run_command,
        "assign_floating_ip": vm.assign_floating_ip,
        "security_rules": [dataclasses.asdict(r) for r in vm.security_rules],
        "engine": None if vm.engine is None else s.EngineOut.of(vm.engine).model_dump(),
    }
    return {"create_vm": True, "rate_limit": spec.rate_limit, "vm_creation_details": details}
