"""Replicas as the admin sees them: creation with its domain checks, rate limit, deletion, detail."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import structlog

from infra.vm import Rule
from orchestrator.domain.engine_spec import EngineSpec
from orchestrator.domain.errors import Conflict, InvalidInput, NotFound
from orchestrator.domain.lifecycle import REASON_DELETED
from orchestrator.fleet.security_rules import (
    ConnectionSources,
    Phase,
    replaced_message,
    replaced_rules,
    rows_of,
    rule_problems,
)
from orchestrator.platform.outbound import OutboundPolicy
from orchestrator.platform.secrets import SecretBox
from orchestrator.store.fleet import FleetStore, ReplicaDetail
from orchestrator.store.tables import Replica, ReplicaSecurityRule

log = structlog.get_logger(__name__)

REASON_RULES_REPLACED = "rules_replaced"
"""An event naming the admin's world-open rules on a managed port, which the orchestrator's own rules replace."""


@dataclass(frozen=True)
class VmSpec:
    """What the admin asked of a managed replica's VM (the toolkit's `vm_creation_details`)."""

    name: str
    environment_name: str
    image_name: str
    flavor_name: str
    key_name: str
    port: int
    run_command: str | None
    assign_floating_ip: bool = True
    security_rules: tuple[Rule, ...] = ()
    engine: EngineSpec | None = None
    """The engine when there is no `run_command`."""
    engine_secrets: Mapping[str, str] = field(default_factory=dict, repr=False)
    """The engine spec's secret environment; sealed at rest."""


@dataclass(frozen=True)
class ReplicaSpec:
    """Either `endpoint` (external) or `vm` (managed) is set; the schema layer guarantees it."""

    endpoint: str | None = None
    rate_limit: int | None = None
    """Requests per second the gateway sends to this replica at most."""
    vm: VmSpec | None = None
    engine_api_key: str | None = field(default=None, repr=False)
    """What the gateway and the prober send to an external engine (vLLM `--api-key`); sealed at rest."""


class ReplicaService:
    def __init__(
        self,
        store: FleetStore,
        nudge: Callable[[], None],
        box: SecretBox,
        on_change: Callable[[], Awaitable[None]],
        *,
        network: ConnectionSources,
        ssh_port: int,
        outbound: OutboundPolicy,
    ) -> None:
        self._store = store
        self._outbound = outbound
        # What a managed replica's own rules are judged against: who may reach SSH (on the backend's port) and
        # the engine port; known here, from the backend, not in the static schema.
        self._network = network
        self._ssh_port = ssh_port
        self._nudge = nudge
        self._box = box
        self._on_change = on_change

    async def count_by_status(self) -> dict[str, int]:
        """How many replicas are in each status, by its name."""
        return await self._store.count_replicas_by_status()

    async def list(self, model_id: int) -> Sequence[Replica]:
        if await self._store.model(model_id) is None:
            raise NotFound("Model not found")
        return await self._store.list_replicas(model_id)

    async def check(self, model_id: int, spec: ReplicaSpec) -> None:
        """Refuses what `create` refuses (NotFound, InvalidInput, Conflict) without making anything: a deployment's
        replica template is judged once, when an admin sets it."""
        await self._prepared(model_id, spec)

    async def create(self, model_id: int, spec: ReplicaSpec, *, deployment: tuple[int, int] | None = None) -> int:
        """A PENDING replica; `deployment` is (id, generation) of the deployment that makes it (None: by hand)."""
        spec, notes = await self._prepared(model_id, spec)
        replica, rules = _rows(model_id, spec)
        if deployment is not None:
            replica.deployment_id, replica.deployment_generation = deployment
        if spec.engine_api_key:
            replica.engine_key_sealed = self._box.seal(spec.engine_api_key)
        if spec.vm is not None and spec.vm.engine_secrets:
            replica.engine_secrets_sealed = self._box.seal(json.dumps(dict(spec.vm.engine_secrets)))
        kind = "managed" if spec.vm else "external"
        message = f"{kind} replica registered" + ("" if deployment is None else f" by deployment {deployment[0]}")
        replica_id = await self._store.create_replica(replica, rules, message, notes)
        log.info(
            "replica.created",
            replica_id=replica_id,
            model_id=model_id,
            kind=kind,
            rules_replaced=len(notes),
            deployment_id=replica.deployment_id,
        )
        self._nudge()
        return replica_id

    async def _prepared(self, model_id: int, spec: ReplicaSpec) -> tuple[ReplicaSpec, Sequence[tuple[str, str]]]:
        """The spec checked, with the admin's world-open rules on a managed port set aside, and the notes (events)
        that say so."""
        if await self._store.model(model_id) is None:
            raise NotFound("Model not found")
        if spec.vm is None:
            if not spec.endpoint:
                raise InvalidInput("endpoint", "LLM EndPoint URL must not be empty.")
            await self._outbound.check("endpoint", spec.endpoint)
            if await self._store.endpoint_in_use(model_id, spec.endpoint):
                raise Conflict("Endpoint already exists")
        elif spec.vm.port == self._ssh_port:  # the serving rules would open SSH to the gateway
            raise InvalidInput("vm_creation_details.port", f"Port {spec.vm.port} is SSH's on this backend.")
        elif problems := rule_problems(
            spec.vm.security_rules, self._network, engine_port=spec.vm.port, ssh_port=self._ssh_port
        ):
            raise InvalidInput("vm_creation_details.security_rules", " ".join(problems))
        notes: list[tuple[str, str]] = []
        if spec.vm is not None and (
            replaced := replaced_rules(spec.vm.security_rules, engine_port=spec.vm.port, ssh_port=self._ssh_port)
        ):
            # Written with the replica: an admin reading its rules must learn why theirs are not among them.
            notes.append((REASON_RULES_REPLACED, replaced_message(replaced, self._network, engine_port=spec.vm.port)))
            gone = {i for i, _ in replaced}
            kept = tuple(r for i, r in enumerate(spec.vm.security_rules) if i not in gone)
            spec = replace(spec, vm=replace(spec.vm, security_rules=kept))
        return spec, notes

    async def set_rate_limit(self, replica_id: int, rate_limit: int) -> None:
        await self._store.set_rate_limit(replica_id, rate_limit)
        await self._on_change()
        log.info("replica.rate_limit_set", replica_id=replica_id, rate_limit=rate_limit)

    async def delete(self, replica_id: int, reason: str = REASON_DELETED, message: str | None = None) -> None:
        """Drain the replica and tear it down; `reason` and `message` say who asked and why (an admin by default,
        or a deployment's keeper)."""
        if message is None:
            await self._store.delete_replica(replica_id, reason)
        else:
            await self._store.delete_replica(replica_id, reason, message)
        await self._on_change()  # out of the routing pool before the answer
        log.info("replica.delete_requested", replica_id=replica_id, reason=reason)
        self._nudge()

    async def detail(self, replica_id: int) -> ReplicaDetail:
        detail = await self._store.replica_detail(replica_id)
        if detail is None:
            raise NotFound("Replica not found")
        return detail


def _rows(model_id: int, spec: ReplicaSpec) -> tuple[Replica, list[ReplicaSecurityRule]]:
    vm = spec.vm
    if vm is None:
        return Replica(model_id=model_id, endpoint=spec.endpoint, rate_limit=spec.rate_limit), []
    replica = Replica(
        model_id=model_id,
        create_vm=True,
        rate_limit=spec.rate_limit,
        name=vm.name,
        environment_name=vm.environment_name,
        image_name=vm.image_name,
        flavor_name=vm.flavor_name,
        key_name=vm.key_name,
        port=vm.port,
        run_command=vm.run_command,
        engine_spec=vm.engine.to_json() if vm.engine else None,
        assign_floating_ip=vm.assign_floating_ip,
    )
    # The store sets replica_id once the replica has its id.
    rules = rows_of(0, Phase.USER, vm.security_rules)
    return replica, rules
