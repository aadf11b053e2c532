"""Request and response bodies of the toolkit API. Unknown fields are refused, as the toolkit does."""

from __future__ import annotations

import dataclasses
import re
from datetime import datetime
from typing import Annotated, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from infra.vm import Rule
from orchestrator.domain.autoscale import AutoscalePolicy
from orchestrator.domain.engine_spec import VLLM_IMAGE, EngineSpec
from orchestrator.fleet.deployments import DeploymentSpec
from orchestrator.fleet.replicas import ReplicaSpec, VmSpec
from orchestrator.fleet.security_rules import prefix_network
from orchestrator.gateway.engine_urls import is_http_url
from orchestrator.platform.secrets import allowlist

FIELD_RULE = "field_rule"
"""Error type of a rule that spans fields: `ctx.field` names the field it is reported on."""


def field_error(field: str, message: str) -> PydanticCustomError:
    """For model validators: report `message` on `field`, as marshmallow's `field_name=` does."""
    return PydanticCustomError(FIELD_RULE, message, {"field": field})


def invalid(message: str) -> PydanticCustomError:
    """For field validators: the error already sits on its field."""
    return PydanticCustomError("invalid", message)


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # PostgreSQL's text cannot hold NUL: refused at the edge, on every string field.
    @field_validator("*")
    @classmethod
    def _no_nul(cls, v: object) -> object:
        if isinstance(v, str) and "\x00" in v:
            raise invalid("Must not contain NUL characters.")
        return v


MAX_ID = 2**31 - 1  # row ids are 32-bit integers on PostgreSQL
Id = Annotated[int, Field(ge=1, le=MAX_ID)]
Name = Annotated[str, Field(min_length=1, max_length=255)]
Port = Annotated[int, Field(ge=1, le=65535)]
RateLimit = Annotated[int, Field(ge=1, le=MAX_ID)]
"""Requests per second; bounded by the 32-bit column it is stored in."""


class GenerateApiKeyIn(_In):
    user_id: Name
    allowed_rpm: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    name: Annotated[str, Field(max_length=255)] | None = None
    allowed_ips: Annotated[list[str], AfterValidator(allowlist)] = []
    """Addresses or networks the key may be used from (LlmEndpoint's IP whitelist); [] means anywhere."""


class DeleteApiKeyIn(_In):
    user_id: Name
    api_key_id: Id


class ModelIn(_In):
    name: Name

    @field_validator("name")
    @classmethod
    def _no_blank(cls, v: str) -> str:
        if v != v.strip():
            raise invalid("Model name must not start or end with whitespace.")
        return v


class SecurityRuleIn(_In):
    direction: Literal["ingress", "egress"] = "ingress"
    protocol: Literal["tcp", "udp"] = "tcp"
    ethertype: Literal["IPv4", "IPv6"] = "IPv4"
    remote_ip_prefix: str = "0.0.0.0/0"
    port_range_min: Port
    port_range_max: Port

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        if self.port_range_min > self.port_range_max:
            raise field_error("port_range_min", "port_range_min must be less than or equal to port_range_max.")
        try:
            net = prefix_network(self.remote_ip_prefix, self.ethertype)
        except ValueError as e:
            raise field_error("remote_ip_prefix", str(e)) from None
        self.remote_ip_prefix = str(net)  # one spelling for nft, the cloud and drift checks (10.0.0.1/8 -> 10.0.0.0/8)
        return self

    def spec(self) -> Rule:
        return Rule(**self.model_dump())


_VM_NAME = re.compile(r"^[^ ][\w -]*[^ ]$")


def _env_sizes(env: dict[str, str]) -> dict[str, str]:
    """At most 64 variables, each name of 1 to 128 characters, each value of at most 4,096. (Checked here rather
    than by the field's constraints, which Litestar's OpenAPI document turns into an array's.)"""
    if len(env) > 64:
        raise PydanticCustomError("invalid", "at most 64 variables")
    for name, value in env.items():
        if not 1 <= len(name) <= 128:
            raise PydanticCustomError("invalid", "a variable's name has 1 to 128 characters: {name}", {"name": name})
        if len(value) > 4096:
            raise PydanticCustomError("invalid", "{name}'s value is over 4096 characters", {"name": name})
    return env


Env = Annotated[dict[str, str], AfterValidator(_env_sizes)]


class EngineSpecIn(_In):
    """Our extension: the engine of a replica given no `run_command` (the vLLM image, its model and arguments)."""

    image: Annotated[str, Field(min_length=1, max_length=255)] = VLLM_IMAGE
    model: Annotated[str, Field(min_length=1, max_length=255)] | None = None
    tensor_parallel_size: Annotated[int, Field(ge=1, le=64)] | None = None
    max_model_len: Annotated[int, Field(ge=1, le=10_000_000)] | None = None
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] | None = None
    extra_args: Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], Field(max_length=64)] = []
    env: Env = {}
    secret_env: Env = {}
    """Sealed at rest like the engine key, never shown (an HF token)."""

    @model_validator(mode="after")
    def _runs(self) -> Self:
        if problems := self.spec().problems(self.secret_env):
            raise PydanticCustomError("invalid", "; ".join(problems))
        return self

    def spec(self) -> EngineSpec:
        fields = self.model_dump(exclude={"extra_args", "secret_env"})
        return EngineSpec(**fields, extra_args=tuple(self.extra_args), secret_env_names=tuple(sorted(self.secret_env)))


class VmCreationIn(_In):
    name: Name
    environment_name: Name
    image_name: Name
    flavor_name: Name
    key_name: Name
    port: Port
    run_command: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    """The engine's shell command (typically a `docker run` of the vLLM image); without it, `engine` says."""
    engine: EngineSpecIn | None = None
    assign_floating_ip: bool = True
    security_rules: Annotated[list[SecurityRuleIn], Field(max_length=64)] = []

    @field_validator("run_command", mode="before")
    @classmethod
    def _blank_is_none(cls, v: object) -> object:
        """The toolkit's UI sends its empty command box as "": no command, so the engine spec says what runs."""
        return None if isinstance(v, str) and not v.strip() else v

    @model_validator(mode="after")
    def _one_engine(self) -> Self:
        if self.run_command is not None and self.engine is not None:
            raise field_error("engine", "Give run_command or engine, not both.")
        return self

    # What the rules may open of SSH and the engine port depends on the backend and the network settings: the
    # replica service judges that (`orchestrator.fleet.security_rules.rule_problems`).

    @field_validator("name")
    @classmethod
    def _name_format(cls, v: str) -> str:
        if not _VM_NAME.match(v):
            raise invalid(
                "Invalid name format. Name must not start or end with a space "
                "and can contain alphanumeric characters, spaces, and hyphens.",
            )
        return v


class ReplicaIn(_In):
    endpoint: Annotated[str, Field(max_length=2048)] | None = None
    rate_limit: RateLimit | None = None
    create_vm: bool = False
    vm_creation_details: VmCreationIn | None = None
    engine_api_key: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    """Our extension: the key the external engine wants (vLLM `--api-key`); stored encrypted, never shown."""

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        if not self.create_vm:
            if not self.endpoint:
                raise field_error("endpoint", "LLM EndPoint URL must not be empty.")
            if not is_http_url(self.endpoint):
                raise field_error("endpoint", "Not a valid URL (http:// or https://).")
        elif self.vm_creation_details is None:
            raise PydanticCustomError(FIELD_RULE, "VM creation details must be provided when create_vm is True.")
        elif self.endpoint:
            raise field_error("endpoint", "A replica with create_vm gets its endpoint from its VM; leave it empty.")
        return self

    def spec(self) -> ReplicaSpec:
        vm = self.vm_creation_details if self.create_vm else None
        return ReplicaSpec(
            endpoint=None if vm else self.endpoint,
            rate_limit=self.rate_limit,
            engine_api_key=self.engine_api_key,
            vm=None
            if vm is None
            else VmSpec(
                **vm.model_dump(exclude={"security_rules", "engine"}),
                security_rules=tuple(r.spec() for r in vm.security_rules),
                engine=None if vm.run_command else (vm.engine or EngineSpecIn()).spec(),
                engine_secrets=vm.engine.secret_env if vm.engine else {},
            ),
        )


class ReplicaUpdateIn(_In):
    rate_limit: RateLimit


# -- responses ----------------------------------------------------------------------------------


class IssuedKeyOut(BaseModel):
    api_key: str
    id: int
    enabled: bool


class MessageOut(BaseModel):
    message: str


class TablesOut(BaseModel):
    tables: list[str]


class TableDataOut(BaseModel):
    data: list[dict[str, object]]


class ModelOut(BaseModel):
    id: int
    name: str


class ModelCreatedOut(BaseModel):
    model_name: str
    id: int


class ReplicaCreatedOut(BaseModel):
    replica_id: int


class ReplicaOut(BaseModel):
    """The toolkit's replica fields, then ours (`status`, `create_vm`)."""

    id: int
    model_id: int
    endpoint: str | None
    rate_limit: int | None
    flavor_name: str | None
    vm_status: Literal["PENDING", "SUCCESS", "FAILED"]
    name: str | None
    environment_name: str | None
    image_name: str | None
    assign_floating_ip: bool | None
    run_command: str | None
    key_name: str | None
    vm_id: str | None
    error_message: str | None
    status: str
    create_vm: bool


class SecurityRuleOut(BaseModel):
    id: int
    origin: str
    direction: str
    protocol: str
    ethertype: str
    remote_ip_prefix: str
    port_range_min: int
    port_range_max: int


class EventOut(BaseModel):
    at: datetime
    from_status: str | None
    to_status: str
    reason: str
    message: str | None


class EngineOut(BaseModel):
    """The engine spec of a replica without a `run_command`; secret variables by name only."""

    image: str
    model: str | None
    tensor_parallel_size: int | None
    max_model_len: int | None
    gpu_memory_utilization: float | None
    extra_args: list[str]
    env: dict[str, str]
    secret_env: list[str]

    @classmethod
    def of(cls, spec: EngineSpec) -> EngineOut:
        fields = dataclasses.asdict(spec)
        return cls(**fields, secret_env=fields.pop("secret_env_names"))


class BootstrapStepOut(BaseModel):
    """One step of the replica's latest bootstrap over SSH, from its events."""

    step: str
    outcome: Literal["changed", "unchanged"]
    at: datetime


class ReplicaDetailOut(ReplicaOut):
    model_name: str
    port: int | None
    vm_address: str | None
    ssh_port: int | None
    host_key: str | None
    """The VM's SSH host key the orchestrator pins (public)."""
    recoveries: int
    status_changed_at: datetime
    termination_reason: str | None
    created_at: datetime
    deleted: bool
    engine: EngineOut | None
    """The engine spec, for a managed replica given no `run_command`."""
    bootstrap: list[BootstrapStepOut]
    engine_log: str | None
    """The engine's last log lines, read over SSH before it closed (secrets redacted)."""
    probe_error: str | None
    """What the latest health probe found wrong (which request, what the engine answered); None once one passes."""
    probe_error_since: datetime | None
    """Since when the probes fail with `probe_error`."""
    ready_deadline: datetime | None
    """STARTING with a failing probe: when the startup grace runs out and the replica is terminated (never_ready)."""
    security_rules: list[SecurityRuleOut]
    events: list[EventOut]


# -- deployments --------------------------------------------------------------------------------

Count = Annotated[int, Field(ge=0, le=1000)]


class AutoscaleIn(_In):
    """Bounds and targets of the autoscaler (`orchestrator.domain.autoscale.AutoscalePolicy`)."""

    min_replicas: Count
    """0 allows scaling to zero."""
    max_replicas: Annotated[int, Field(ge=1, le=1000)]
    target_waiting: Annotated[float, Field(gt=0, le=100_000)] = 2.0
    """Requests waiting per READY replica above which the deployment grows."""
    scale_up_delay_s: Annotated[float, Field(ge=0, le=86_400)] = 30.0
    scale_down_delay_s: Annotated[float, Field(ge=0, le=86_400)] = 300.0

    @model_validator(mode="after")
    def _bounds(self) -> Self:
        if self.min_replicas > self.max_replicas:
            raise field_error("min_replicas", "min_replicas must not be above max_replicas.")
        return self

    def policy(self) -> AutoscalePolicy:
        return AutoscalePolicy(**self.model_dump())


class DeploymentIn(_In):
    """A model's desired replicas: the template each is made from, and a fixed count or an autoscaling policy."""

    template: ReplicaIn
    """A managed replica's body, as `POST /api/v1/models/{id}/replicas` takes it (`create_vm` true)."""
    replicas: Count | None = None
    autoscale: AutoscaleIn | None = None
    max_surge: Annotated[int, Field(ge=1, le=1000)] = 1
    """New replicas a roll brings up beyond the count before it drains an old one."""

    @model_validator(mode="after")
    def _one_count(self) -> Self:
        if self.replicas is not None and self.autoscale is not None:
            raise field_error("autoscale", "Give replicas (a fixed count) or autoscale, not both.")
        if self.replicas is None and self.autoscale is None:
            raise field_error("replicas", "Give replicas (a fixed count) or autoscale (the autoscaler's bounds).")
        if not self.template.create_vm:
            raise field_error("template", "A deployment's replicas are made from a VM template: create_vm true.")
        return self

    def spec(self) -> DeploymentSpec:
        return DeploymentSpec(
            template=self.template.spec(),
            replicas=self.replicas,
            autoscale=None if self.autoscale is None else self.autoscale.policy(),
            max_surge=self.max_surge,
        )


class DeploymentMemberOut(BaseModel):
    """One replica the deployment made."""

    id: int
    status: str
    generation: int | None
    """Its template's generation: older than the deployment's while a roll replaces it."""
    termination_reason: str | None
    created_at: datetime


class RollOut(BaseModel):
    """A roll under way: replicas of an older template alive beside the current one's."""

    generation: int
    new: int
    """Replicas of the current template alive."""
    new_ready: int
    old: int
    """Replicas of older templates alive (serving until a new READY one stands for each)."""


class DeploymentOut(BaseModel):
    id: int
    model_id: int
    template: dict[str, object]
    """The template as set, secret values left out (`engine.secret_env` lists their names)."""
    replicas: int | None
    autoscale: dict[str, int | float] | None
    desired: int
    """How many replicas the deployment wants now (the count, or the autoscaler's last decision)."""
    max_surge: int
    generation: int
    spec_hash: str
    status: Literal["steady", "scaling", "rolling", "rollout_failed", "failing"]
    message: str | None
    """Why it is in its status."""
    roll: RollOut | None
    members: list[DeploymentMemberOut]
    """Its replicas alive, and those of the current attempts that ended."""
    created_at: datetime
    updated_at: datetime


class DeploymentDeletedOut(BaseModel):
    message: str
    drained: list[int]
    """The replicas now DRAINING: each takes no new calls, ends its calls in flight, then is torn down."""
