"""Deployments: a model's desired replicas, set by an admin (`DeploymentService`) and kept by the reconcile job on
the leader (`DeploymentKeeper`): missing replicas made from the template, ended ones replaced, surplus ones drained,
and replicas of an older template rolled (the rules are `orchestrator.domain.rollout`'s). Replicas made by hand
(no deployment) are never touched."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from infra.vm import Rule
from orchestrator.domain.autoscale import AutoscalePolicy, Autoscaler, Load
from orchestrator.domain.engine_spec import EngineSpec
from orchestrator.domain.errors import InvalidInput, NotFound
from orchestrator.domain.lifecycle import REASON_DEPLOYMENT_DELETED
from orchestrator.domain.rollout import GONE, DeploymentStatus, Member, Plan, Target, plan
from orchestrator.fleet.replicas import ReplicaService, ReplicaSpec, VmSpec
from orchestrator.platform.secrets import SecretBox
from orchestrator.store.deployments import DeploymentStore, MemberRow
from orchestrator.store.tables import Deployment, Replica, row_id, utcnow

log = structlog.get_logger(__name__)

LoadOf = Callable[[Deployment, list[int]], "Load | Awaitable[Load | None] | None"]
"""A deployment's current load, for its autoscaling policy: the engines' metrics of the replicas given (its alive
ones of the current template) and the gateway's queue for its model."""


def no_load(deployment: Deployment, replica_ids: list[int]) -> Load | None:
    return None


@dataclass(frozen=True)
class DeploymentSpec:
    """What an admin asks of a model's deployment: a managed replica's template and how many."""

    template: ReplicaSpec
    replicas: int | None = None
    """A fixed count; None when `autoscale` says."""
    autoscale: AutoscalePolicy | None = None
    max_surge: int = 1


@dataclass(frozen=True)
class DeploymentView:
    deployment: Deployment
    template: ReplicaSpec
    """Its secret values left out (`engine_secrets` empty; their names are in the engine spec)."""
    autoscale: AutoscalePolicy | None
    replicas: list[Replica]
    """Its replicas still alive, and the ended ones of its current template's attempts."""


def template_json(spec: ReplicaSpec) -> str:
    """The template as stored (and hashed): everything but its secret values, in one canonical spelling."""
    vm = spec.vm
    assert vm is not None  # the service refuses a template without a VM
    fields = dataclasses.asdict(dataclasses.replace(vm, engine_secrets={}, engine=None))
    fields["engine"] = json.loads(vm.engine.to_json()) if vm.engine else None
    fields.pop("engine_secrets")
    return json.dumps({"rate_limit": spec.rate_limit, "vm": fields}, sort_keys=True)


def template_of(text: str, secrets: Mapping[str, str]) -> ReplicaSpec:
    data = json.loads(text)
    vm: dict[str, Any] = data["vm"]
    engine_fields = vm.pop("engine")
    engine = None if engine_fields is None else EngineSpec.from_json(json.dumps(engine_fields))
    rules = tuple(Rule(**r) for r in vm.pop("security_rules"))
    return ReplicaSpec(
        rate_limit=data["rate_limit"],
        vm=VmSpec(**vm, engine=engine, security_rules=rules, engine_secrets=dict(secrets)),
    )


def template_secrets(box: SecretBox, deployment: Deployment) -> dict[str, str]:
    """The template's secret values (the engine's `secret_env`), unsealed."""
    sealed = deployment.template_secrets_sealed
    secrets: dict[str, str] = json.loads(box.open(sealed)) if sealed else {}
    return secrets


def policy_of(text: str | None) -> AutoscalePolicy | None:
    return None if text is None else AutoscalePolicy(**json.loads(text))


class DeploymentService:
    """The admin's side: set, read and stop keeping a model's deployment."""

    def __init__(
        self,
        store: DeploymentStore,
        replicas: ReplicaService,
        box: SecretBox,
        nudge: Callable[[], None],
    ) -> None:
        self._store = store
        self._replicas = replicas
        self._box = box
        self._nudge = nudge

    async def put(self, model_id: int, spec: DeploymentSpec) -> DeploymentView:
        if spec.template.vm is None:
            raise InvalidInput("template.create_vm", "A deployment's replicas are made from a VM template: create_vm.")
        try:
            await self._replicas.check(model_id, spec.template)  # the very checks a hand-made replica passes
        except InvalidInput as e:
            raise InvalidInput(f"template.{e.field}", e.message) from e
        template = template_json(spec.template)
        secrets = dict(spec.template.vm.engine_secrets)
        fields: dict[str, Any] = {
            "template": template,
            "template_secrets_sealed": self._box.seal(json.dumps(secrets)) if secrets else None,
            "replicas": spec.replicas,
            "autoscale": None if spec.autoscale is None else json.dumps(dataclasses.asdict(spec.autoscale)),
            "max_surge": spec.max_surge,
            "spec_hash": hashlib.sha256(template.encode()).hexdigest(),
            # An admin's PUT is also the retry of a failing deployment: earlier failures no longer count.
            "attempts_since": utcnow(),
        }
        current = await self._store.live(model_id)
        if current is None or template != current.template or secrets != template_secrets(self._box, current):
            fields["generation"] = 1 if current is None else current.generation + 1
        if current is None or spec.replicas is not None or spec.autoscale != policy_of(current.autoscale):
            fields["desired"] = _start_count(spec, None if current is None else current.desired)
        fields["status"], fields["message"] = DeploymentStatus.SCALING, "changed by an admin"
        deployment = await self._store.put(model_id, fields)
        log.info(
            "deployment.set",
            deployment_id=deployment.id,
            model_id=model_id,
            generation=deployment.generation,
            desired=deployment.desired,
            autoscale=spec.autoscale is not None,
        )
        self._nudge()
        return await self._view(deployment)

    async def get(self, model_id: int) -> DeploymentView:
        deployment = await self._store.live(model_id)
        if deployment is None:
            raise NotFound("Deployment not found")
        return await self._view(deployment)

    async def delete(self, model_id: int) -> list[int]:
        """Stop keeping it: its replicas are drained (DRAINING waits for their calls) and torn down. Returns them."""
        deployment = await self._store.delete(model_id)
        rows = await self._store.members(row_id(deployment.id), utcnow())
        drained = [m.id for m in rows if m.status not in GONE]
        for replica_id in drained:
            await _drain(self._replicas, replica_id, REASON_DEPLOYMENT_DELETED, "the deployment was deleted")
        log.info("deployment.deleted", deployment_id=deployment.id, model_id=model_id, drained=drained)
        return drained

    async def _view(self, deployment: Deployment) -> DeploymentView:
        replicas = list(await self._store.replicas(row_id(deployment.id), deployment.attempts_since))
        return DeploymentView(
            deployment, template_of(deployment.template, {}), policy_of(deployment.autoscale), replicas
        )


def _start_count(spec: DeploymentSpec, desired: int | None) -> int:
    """The count a PUT sets: a fixed one as given; an autoscaled one at its minimum when new, else the count it
    wants now brought within the new bounds (a new policy never drains what the old one had grown to)."""
    if spec.replicas is not None:
        return spec.replicas
    policy = spec.autoscale
    assert policy is not None  # the API asks for one of the two
    if desired is None:
        return policy.min_replicas
    return min(max(desired, policy.min_replicas), max(policy.min_replicas, policy.max_replicas))


async def _drain(replicas: ReplicaService, replica_id: int, reason: str, message: str) -> bool:
    try:
        await replicas.delete(replica_id, reason, message)
    except NotFound:  # deleted meanwhile (by an admin, or its model)
        return False
    return True


class DeploymentKeeper:
    """The reconcile job's part for deployments: each live deployment's plan, carried out."""

    def __init__(
        self,
        store: DeploymentStore,
        replicas: ReplicaService,
        box: SecretBox,
        *,
        max_failed_starts: int,
        autoscaler: Autoscaler | None = None,
        load_of: LoadOf = no_load,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._replicas = replicas
        self._box = box
        self._max_failed_starts = max_failed_starts
        self._autoscaler = autoscaler or Autoscaler()
        self._load_of = load_of
        self._clock = clock
        self._scaled: dict[int, int] = {}
        """Autoscaled deployments by id, with the generation the autoscaler's memory of each was gathered on: a
        deployment deleted, switched to a fixed count or rolled to another template is forgotten (what one replica
        was seen to run at most is wrong for a smaller engine)."""

    async def keep(self) -> bool:
        """One look at every deployment; True if a replica was made or drained."""
        acted = False
        for deployment_id in await self._store.forget_deleted_models():
            log.info("deployment.model_deleted", deployment_id=deployment_id)
        for replica_id in await self._store.orphans():  # a deletion that stopped half-way
            acted |= await _drain(self._replicas, replica_id, REASON_DEPLOYMENT_DELETED, "the deployment was deleted")
        live = await self._store.all_live()
        for gone in set(self._scaled) - {row_id(d.id) for d in live}:
            self._forget(gone)
        for deployment in live:
            try:
                acted |= await self._keep_one(deployment)
            except Exception:  # one deployment failing never stops the others
                log.exception("deployment.keep_failed", deployment_id=deployment.id)
        return acted

    async def _keep_one(self, deployment: Deployment) -> bool:
        deployment_id = row_id(deployment.id)
        rows = await self._store.members(deployment_id, deployment.attempts_since)
        # Its load is that of its own replicas of the current template: a hand-made replica, or an old one still
        # serving mid-roll, would count as READY while those it wants are still starting.
        alive = [m for m in rows if m.status not in GONE]
        current = [m.id for m in alive if m.generation == deployment.generation]
        desired, why = await self._desired(deployment, current, rolling=len(current) < len(alive))
        target = Target(deployment.generation, desired, deployment.max_surge, self._max_failed_starts)
        decided = plan([_member(m, deployment) for m in rows], target)
        message = decided.message if why is None else f"{why}; {decided.message}"
        if await self._store.note(deployment_id, status=decided.status, message=message, desired=desired):
            log_status = log.warning if decided.status in _BAD else log.info
            log_status("deployment.status", deployment_id=deployment_id, status=decided.status, message=message)
        return await self._carry_out(deployment, decided)

    async def _desired(
        self, deployment: Deployment, replica_ids: list[int], *, rolling: bool
    ) -> tuple[int, str | None]:
        policy = policy_of(deployment.autoscale)
        deployment_id = row_id(deployment.id)
        if policy is None:
            if deployment_id in self._scaled:
                self._forget(deployment_id)
            return deployment.replicas or 0, None
        if self._scaled.get(deployment_id) != deployment.generation:
            self._forget(deployment_id)  # first seen (nothing to forget), or another template
            self._scaled[deployment_id] = deployment.generation
        if rolling:
            # The old replicas carry most calls while the new ones come up: the count is judged once they are gone.
            return deployment.desired, "the count is held while the deployment rolls"
        load = self._load_of(deployment, replica_ids)
        if inspect.isawaitable(load):
            load = await load
        decision = self._autoscaler.decide(deployment_id, policy, deployment.desired, load, self._clock())
        return decision.desired, decision.reason

    def _forget(self, deployment_id: int) -> None:
        self._autoscaler.forget(deployment_id)
        self._scaled.pop(deployment_id, None)

    async def _carry_out(self, deployment: Deployment, decided: Plan) -> bool:
        for order in decided.drain:
            why = f"drained by deployment {deployment.id} ({decided.status}): {order.reason}"
            await _drain(self._replicas, order.replica_id, order.reason, why)
            log.info(
                "deployment.drained", deployment_id=deployment.id, replica_id=order.replica_id, reason=order.reason
            )
        if decided.create:
            template = self._template(deployment)
            for _ in range(decided.create):
                replica_id = await self._replicas.create(
                    deployment.model_id, template, deployment=(row_id(deployment.id), deployment.generation)
                )
                log.info(
                    "deployment.replica_made",
                    deployment_id=deployment.id,
                    replica_id=replica_id,
                    generation=deployment.generation,
                    status=decided.status,
                )
        return bool(decided.drain) or decided.create > 0

    def _template(self, deployment: Deployment) -> ReplicaSpec:
        return template_of(deployment.template, template_secrets(self._box, deployment))


_BAD = frozenset({DeploymentStatus.FAILING, DeploymentStatus.ROLLOUT_FAILED})


def _member(row: MemberRow, deployment: Deployment) -> Member:
    return Member(
        id=row.id,
        status=row.status,
        generation=row.generation,
        ever_ready=row.ever_ready,
        served_s=_served_s(row),
        termination_reason=row.termination_reason,
        counted=row.created_at >= deployment.attempts_since,
    )


def _served_s(row: MemberRow) -> float | None:
    if row.first_ready_at is None or row.ended_at is None:
        return None
    return (row.ended_at - row.first_ready_at).total_seconds()
