"""SQLModel tables. Names follow the Hyperstack toolkit where the concept is the same, so its admin UI
reads them unchanged through `/api/v1/tables`. Columns marked `secret` never leave the store in clear."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlmodel import Field, SQLModel

# Column info flag read by the table browser: the value is replaced by a placeholder.
SECRET: dict[str, Any] = {"info": {"secret": True}}


NEVER_REUSED: dict[str, Any] = {"sqlite_autoincrement": True}
"""Table options of every table with an integer id: SQLite's AUTOINCREMENT, so that the id of a deleted row is
never given to a new one (without it SQLite reuses the highest id, and a deleted key's late records, threads or
charges would land on the next key made). PostgreSQL's sequences never go back anyway."""


def money() -> Any:
    """A sum of money or a price, as an integer count of `orchestrator.domain.money.UNIT` (exact on both databases)."""
    return Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))


def row_id(value: int | None) -> int:
    """The id of a row read back from the database, which always has one (None only before an insert)."""
    assert value is not None
    return value


def table_of(model: type[SQLModel]) -> Table:
    """A table model's Core table, for statements SQLModel does not build (bulk inserts, upserts)."""
    table: Table = model.__table__  # type: ignore[attr-defined]
    return table


def storable(text: str | None) -> str | None:
    """Text as both databases can keep it: PostgreSQL refuses NUL characters in text, so they become U+FFFD."""
    return text.replace("\x00", "\ufffd") if text and "\x00" in text else text


def utcnow() -> datetime:
    """Aware UTC; SQLModel's column type stores it as UTC on both databases and returns it aware."""
    return datetime.now(UTC)


class LlmModel(SQLModel, table=True):
    __tablename__ = "llm_models"
    __table_args__ = (
        # Names are unique among live models; a deleted model's name can be registered again.
        Index(
            "uq_llm_models_live_name",
            "name",
            unique=True,
            sqlite_where=text("deleted_at IS NULL"),
            postgresql_where=text("deleted_at IS NULL"),
        ),
        NEVER_REUSED,
    )

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=255)
    provider: str = Field(default="vllm", sa_column=Column(String(64), nullable=False, server_default="vllm"))
    multiple: bool = Field(default=False, sa_column=Column(Boolean, nullable=False, server_default=text("false")))
    """Multimodal: takes images as well as text."""
    config: str = Field(default="{}", sa_column=Column(Text, nullable=False, server_default="{}"))
    """A JSON object kept for the admin (the connector's model config)."""
    price_in: int = money()
    """Per prompt token."""
    price_out: int = money()
    """Per completion token."""
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime | None = None
    deleted_at: datetime | None = None


class Replica(SQLModel, table=True):
    __tablename__ = "replicas"
    __table_args__ = (Index("ix_replicas_status", "status"), NEVER_REUSED)

    id: int | None = Field(default=None, primary_key=True)
    model_id: int = Field(sa_column=Column(Integer, ForeignKey("llm_models.id"), nullable=False, index=True))
    create_vm: bool = False
    endpoint: str | None = Field(default=None, max_length=2048)
    rate_limit: int | None = None
    status: str = Field(default="PENDING", max_length=16)
    status_changed_at: datetime = Field(default_factory=utcnow)
    termination_reason: str | None = Field(default=None, max_length=64)
    error_message: str | None = Field(default=None, sa_column=Column(Text))
    # The toolkit's VM creation details, kept as given.
    name: str | None = Field(default=None, max_length=255)
    environment_name: str | None = Field(default=None, max_length=255)
    image_name: str | None = Field(default=None, max_length=255)
    flavor_name: str | None = Field(default=None, max_length=255)
    assign_floating_ip: bool | None = None
    run_command: str | None = Field(default=None, sa_column=Column(Text))
    key_name: str | None = Field(default=None, max_length=255)
    port: int | None = None
    vm_id: str | None = Field(default=None, max_length=255)
    vm_address: str | None = Field(default=None, max_length=64)
    """Managed: where the VM's SSH and engine are reached (public IP, or the sandbox address)."""
    ssh_port: int | None = None
    ssh_user: str | None = Field(default=None, max_length=64)
    host_key: str | None = Field(default=None, sa_column=Column(Text))
    """Managed: the VM's SSH host key (OpenSSH public line), generated here and pinned before first contact."""
    host_key_sealed: str | None = Field(default=None, sa_column=Column(Text, **SECRET))
    """Managed: the private half, injected into the VM; encrypted at rest."""
    ssh_key_sealed: str | None = Field(default=None, sa_column=Column(Text, **SECRET))
    """Managed: the orchestrator's per-replica SSH login key; encrypted at rest."""
    recoveries: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
    """Managed: engine restarts done after the replica went UNHEALTHY."""
    engine_key_sealed: str | None = Field(default=None, sa_column=Column(Text, **SECRET))
    """The key the gateway sends to this replica's engine (vLLM `--api-key`), encrypted at rest."""
    engine_spec: str | None = Field(default=None, sa_column=Column(Text))
    """Managed without a `run_command`: the engine's image, model, arguments and environment (JSON of
    `orchestrator.domain.engine_spec.EngineSpec`)."""
    engine_secrets_sealed: str | None = Field(default=None, sa_column=Column(Text, **SECRET))
    """The engine spec's secret environment (JSON object), encrypted at rest."""
    engine_log: str | None = Field(default=None, sa_column=Column(Text))
    """Managed: the engine's last log lines, read over SSH before SSH closes (secrets redacted)."""
    probe_error: str | None = Field(default=None, sa_column=Column(Text))
    """What the latest health probe found wrong (None once a probe passes, and always when READY)."""
    probe_error_since: datetime | None = None
    """Since when the probes fail with `probe_error`: its first probe of a run of the same error."""
    ready_deadline: datetime | None = None
    """STARTING with a failing probe: when the startup grace runs out and the replica is terminated (never_ready)."""
    created_at: datetime = Field(default_factory=utcnow)
    delete_requested_at: datetime | None = None
    """Set when an admin deletes the replica: it leaves the toolkit listings at once, the row stays."""
    deployment_id: int | None = Field(
        default=None, sa_column=Column(Integer, ForeignKey("deployments.id"), nullable=True, index=True)
    )
    """The deployment that made this replica and keeps it; None for a replica made by hand (never touched by one)."""
    deployment_generation: int | None = None
    """The deployment's `generation` (its replica template) this replica was made from: an older one is rolled."""


class Deployment(SQLModel, table=True):
    """A model's desired replicas, kept by the reconcile job: how many (a fixed count, or bounds and targets for
    the autoscaler) and what each is made from (a managed replica's template). One live deployment per model."""

    __tablename__ = "deployments"
    __table_args__ = (
        Index(
            "uq_deployments_live_model",
            "model_id",
            unique=True,
            sqlite_where=text("deleted_at IS NULL"),
            postgresql_where=text("deleted_at IS NULL"),
        ),
        NEVER_REUSED,
    )

    id: int | None = Field(default=None, primary_key=True)
    model_id: int = Field(sa_column=Column(Integer, ForeignKey("llm_models.id"), nullable=False))
    template: str = Field(sa_column=Column(Text, nullable=False))
    """Every replica's template, JSON: the VM creation details (or engine spec), port and rate limit."""
    template_secrets_sealed: str | None = Field(default=None, sa_column=Column(Text, **SECRET))
    """The engine spec's secret environment (JSON object), encrypted at rest."""
    replicas: int | None = None
    """A fixed count; None when `autoscale` is set."""
    autoscale: str | None = Field(default=None, sa_column=Column(Text))
    """The autoscaling policy (JSON of `orchestrator.domain.autoscale.AutoscalePolicy`); None for a fixed count."""
    desired: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
    """How many replicas the deployment wants now (the fixed count, or the autoscaler's last decision)."""
    max_surge: int = Field(default=1, sa_column=Column(Integer, nullable=False, server_default="1"))
    """New replicas a roll brings up beyond `desired` before any old one is drained."""
    generation: int = Field(default=1, sa_column=Column(Integer, nullable=False, server_default="1"))
    """Bumped whenever the template (or its secrets) changes: replicas of an older one are rolled."""
    spec_hash: str = Field(max_length=64)
    """SHA-256 of the template's JSON, shown to the admin (secrets are not in it; `generation` counts them)."""
    status: str = Field(default="steady", max_length=16)
    """`steady`, `scaling`, `rolling`, `rollout_failed` or `failing` (see `orchestrator.fleet.deployments`)."""
    message: str | None = Field(default=None, sa_column=Column(Text))
    """Why the deployment is in its status: the last decision, or the failure that stopped it."""
    attempts_since: datetime = Field(default_factory=utcnow)
    """Replicas made before this do not count towards `failing` (set when the spec changes or an admin retries)."""
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    deleted_at: datetime | None = None
    """Set when an admin stops keeping it: its replicas are drained, the row stays for their audit."""


class ReplicaEvent(SQLModel, table=True):
    __tablename__ = "replica_events"
    __table_args__ = NEVER_REUSED

    id: int | None = Field(default=None, primary_key=True)
    replica_id: int = Field(sa_column=Column(Integer, ForeignKey("replicas.id"), nullable=False, index=True))
    at: datetime = Field(default_factory=utcnow)
    from_status: str | None = Field(default=None, max_length=16)
    to_status: str = Field(max_length=16)
    reason: str = Field(max_length=64)
    message: str | None = Field(default=None, sa_column=Column(Text))


class ReplicaSecurityRule(SQLModel, table=True):
    __tablename__ = "replica_security_rules"
    __table_args__ = NEVER_REUSED

    id: int | None = Field(default=None, primary_key=True)
    replica_id: int = Field(sa_column=Column(Integer, ForeignKey("replicas.id"), nullable=False, index=True))
    origin: str = Field(default="user", max_length=16)
    """Who asked for the rule: `user` (vm_creation_details) or a lifecycle phase of the orchestrator."""
    direction: str = Field(max_length=8)
    protocol: str = Field(max_length=8)
    ethertype: str = Field(max_length=8)
    remote_ip_prefix: str = Field(max_length=64)
    port_range_min: int
    port_range_max: int


class ApiKey(SQLModel, table=True):
    """One key table for every API surface; only the keyed hash of a key is stored."""

    __tablename__ = "api_key"
    __table_args__ = NEVER_REUSED

    id: int | None = Field(default=None, primary_key=True)
    user_id: str = Field(sa_column=Column(String(255), nullable=False, index=True))
    name: str | None = Field(default=None, max_length=255)
    key_hash: str = Field(sa_column=Column(String(64), nullable=False, unique=True, **SECRET))
    key_hint: str = Field(max_length=8)
    enabled: bool = True
    allowed_rpm: int = 160
    created_at: datetime = Field(default_factory=utcnow)
    kind: str = Field(default="toolkit", sa_column=Column(String(16), nullable=False, server_default="toolkit"))
    """`toolkit` (sk-, every model, never refused for spend) or `connector` (br-, bound models, metered)."""
    role: str = Field(default="user", sa_column=Column(String(16), nullable=False, server_default="user"))
    group_id: int | None = Field(
        default=None, sa_column=Column(Integer, ForeignKey("key_group.id", ondelete="SET NULL"), index=True)
    )
    email: str | None = Field(default=None, max_length=255)
    month_quota: int = money()
    balance: int = money()
    month_fee: int = money()
    """Spent from this month's quota (balance spending is not counted here)."""
    fee_month: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
    """The month `month_fee` belongs to, as YYYYMM; a charge in a later month starts it from zero."""
    total_fee: int = money()
    updated_at: datetime = Field(default_factory=utcnow)
    allowed_ips: str = Field(default="", sa_column=Column(Text, nullable=False, server_default=""))
    """Comma-separated addresses or networks the key may be used from (LlmEndpoint's rule); empty: anywhere."""


class KeyGroup(SQLModel, table=True):
    __tablename__ = "key_group"
    __table_args__ = NEVER_REUSED

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_column=Column(String(255), nullable=False, unique=True))
    key: str | None = Field(default=None, max_length=255)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class KeyModel(SQLModel, table=True):
    """A model an API key may call."""

    __tablename__ = "key_model"
    __table_args__ = (UniqueConstraint("key_id", "model_id"), NEVER_REUSED)

    id: int | None = Field(default=None, primary_key=True)
    key_id: int = Field(sa_column=Column(Integer, ForeignKey("api_key.id", ondelete="CASCADE"), nullable=False))
    model_id: int = Field(
        sa_column=Column(Integer, ForeignKey("llm_models.id", ondelete="CASCADE"), nullable=False, index=True)
    )
    created_at: datetime = Field(default_factory=utcnow)


class GroupModel(SQLModel, table=True):
    """A model every key of a group may call."""

    __tablename__ = "group_model"
    __table_args__ = (UniqueConstraint("group_id", "model_id"), NEVER_REUSED)

    id: int | None = Field(default=None, primary_key=True)
    group_id: int = Field(sa_column=Column(Integer, ForeignKey("key_group.id", ondelete="CASCADE"), nullable=False))
    model_id: int = Field(
        sa_column=Column(Integer, ForeignKey("llm_models.id", ondelete="CASCADE"), nullable=False, index=True)
    )
    created_at: datetime = Field(default_factory=utcnow)


class Payment(SQLModel, table=True):
    """A recharge of a key's balance."""

    __tablename__ = "payment"
    __table_args__ = NEVER_REUSED

    id: int | None = Field(default=None, primary_key=True)
    key_id: int = Field(
        sa_column=Column(Integer, ForeignKey("api_key.id", ondelete="CASCADE"), nullable=False, index=True)
    )
    fee: int = money()
    created_at: datetime = Field(default_factory=utcnow)


class ChatSession(SQLModel, table=True):
    """The calls a client grouped under one `Session-Id` header (scoped to its key)."""

    __tablename__ = "chat_session"
    __table_args__ = (UniqueConstraint("key_id", "key"), NEVER_REUSED)

    id: int | None = Field(default=None, primary_key=True)
    key_id: int = Field(sa_column=Column(Integer, ForeignKey("api_key.id", ondelete="CASCADE"), nullable=False))
    key: str = Field(max_length=128)
    """The client's Session-Id."""
    title: str | None = Field(default=None, max_length=64)
    total_in_tokens: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    total_out_tokens: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    total_fee: int = money()
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class BotConnector(SQLModel, table=True):
    """A chat bot (Feishu) that answers as one of our API keys."""

    __tablename__ = "bot_connector"
    __table_args__ = NEVER_REUSED

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    provider: str = Field(default="feishu", max_length=64)
    config: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    """The config's public fields as a JSON object (appId, modelId)."""
    secrets_sealed: str = Field(sa_column=Column(Text, nullable=False, **SECRET))
    """The config's secret fields (appSecret, apiKey, encryptKey) as a JSON object, encrypted at rest."""
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class BotEvent(SQLModel, table=True):
    """An event a bot has taken: a platform that delivers it again is answered once."""

    __tablename__ = "bot_event"
    __table_args__ = (UniqueConstraint("bot_id", "event_id"), NEVER_REUSED)

    id: int | None = Field(default=None, primary_key=True)
    bot_id: int = Field(sa_column=Column(Integer, ForeignKey("bot_connector.id", ondelete="CASCADE"), nullable=False))
    event_id: str = Field(max_length=128)
    created_at: datetime = Field(default_factory=utcnow)


class Metric(SQLModel, table=True):
    """One row per gateway call: the toolkit's usage row and the connector's chat thread.

    The toolkit's columns first (`input` is the whole prompt, `choices` the completion's text), then ours.
    """

    __tablename__ = "metric"
    __table_args__ = NEVER_REUSED

    id: int | None = Field(default=None, primary_key=True)
    api_key_id: int | None = Field(default=None, sa_column=Column(Integer, ForeignKey("api_key.id"), index=True))
    input: str | None = Field(default=None, sa_column=Column(Text))
    created: int = Field(default=0, index=True)
    """Unix seconds: the toolkit's monitoring page plots against it."""
    model: str | None = Field(default=None, max_length=255)
    choices: str | None = Field(default=None, sa_column=Column(Text))
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    duration: float | None = None
    replica_id: int | None = None
    status_code: int | None = None
    session_id: int | None = Field(
        default=None, sa_column=Column(Integer, ForeignKey("chat_session.id", ondelete="CASCADE"), index=True)
    )
    prompt: str | None = Field(default=None, sa_column=Column(Text))
    """The last message of the prompt."""
    price_in: int = money()
    price_out: int = money()
    fee: int = money()
    first_byte_latency: int | None = None
    """Milliseconds from the request to the first byte of the answer."""
    stream: bool | None = None


class CreditRate(SQLModel, table=True):
    """LlmEndpoint's prices: what a model's calls cost in credits on `/api/v1/completions` and the queue.

    In units per character of the user's messages and per `max_tokens` asked; seeded with the 18 models of
    LlmEndpoint's rate table. A credit is `CREDIT` units (10^-4 cent)."""

    __tablename__ = "credit_rate"

    model: str = Field(sa_column=Column(String(255), primary_key=True))
    input_rate: int = money()
    output_rate: int = money()


class CompletionTask(SQLModel, table=True):
    """A queued LlmEndpoint completion (`/api/v1/qcompletions`): queued -> processing -> completed | failed."""

    __tablename__ = "completion_task"
    __table_args__ = (Index("ix_completion_task_status_created", "status", "created_at"),)

    id: str = Field(sa_column=Column(String(36), primary_key=True))
    key_id: int = Field(
        sa_column=Column(Integer, ForeignKey("api_key.id", ondelete="CASCADE"), nullable=False, index=True)
    )
    model: str = Field(max_length=255)
    request: str = Field(sa_column=Column(Text, nullable=False))
    """The validated request, as JSON."""
    status: str = Field(default="queued", sa_column=Column(String(16), nullable=False, server_default="queued"))
    result: str | None = Field(default=None, sa_column=Column(Text))
    error: str | None = Field(default=None, sa_column=Column(Text))
    attempts: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    completed_at: datetime | None = None


class ExternalEndpoint(SQLModel, table=True):
    """Moonshot's llm_endpoint: an external OpenAI-compatible API the gateway routes to as a replica of the
    model named by the endpoint's id."""

    __tablename__ = "llm_endpoint"

    id: str = Field(sa_column=Column(String(255), primary_key=True))
    """The slug of the name, lower-cased."""
    name: str = Field(sa_column=Column(String(255), nullable=False))
    connector_type: str = Field(sa_column=Column(String(64), nullable=False))
    uri: str = Field(sa_column=Column(Text, nullable=False))
    token_sealed: str = Field(default="", sa_column=Column(Text, nullable=False, server_default="", **SECRET))
    max_calls_per_second: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
    max_concurrency: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
    params: str = Field(default="{}", sa_column=Column(Text, nullable=False, server_default="{}"))
    """A JSON object of defaults merged into every request sent to the endpoint."""
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class JournalSegment(SQLModel, table=True):
    """A segment of a server process's call journal whose calls are in `metric` (marked in the same transaction
    that wrote them), so that a journal replayed after a crash writes each call exactly once."""

    __tablename__ = "journal_segment"

    name: str = Field(sa_column=Column(String(128), primary_key=True))
    written_at: datetime = Field(default_factory=utcnow)


class Host(SQLModel, table=True):
    """A GPU server the team already owns, registered by an admin: replicas of its pool are placed on it and
    bootstrapped over SSH as a VM is (the `hosts` backend)."""

    __tablename__ = "hosts"
    __table_args__ = NEVER_REUSED

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    pool: str = Field(sa_column=Column(String(255), nullable=False, index=True))
    """Replicas whose `environment_name` is this pool may be placed here."""
    address: str = Field(max_length=255)
    ssh_port: int = Field(default=22)
    ssh_user: str = Field(max_length=64)
    """A login with passwordless sudo; each replica's own key is authorised for it while the replica lives."""
    ssh_key_sealed: str = Field(sa_column=Column(Text, nullable=False, **SECRET))
    """The admin's private key for the login (OpenSSH PEM), encrypted at rest; never returned or logged."""
    host_key: str = Field(sa_column=Column(Text, nullable=False))
    """The server's SSH host key (an OpenSSH public line), pinned before first contact."""
    gpus: int = Field(default=0)
    """GPUs 0 .. gpus-1 are the orchestrator's to hand out (CUDA_VISIBLE_DEVICES of each replica)."""
    disabled: bool = Field(default=False, sa_column=Column(Boolean, nullable=False, server_default=text("false")))
    """No new replica is placed on a disabled host; those on it stay."""
    created_at: datetime = Field(default_factory=utcnow)


class HostPlacement(SQLModel, table=True):
    """Where a replica runs on a host: which GPUs and which engine port. It holds them until the replica is
    TERMINATED (a placement of a terminated replica counts for nothing and is removed by the next placement)."""

    __tablename__ = "host_placements"
    __table_args__ = (UniqueConstraint("host_id", "engine_port", name="uq_host_placements_port"),)

    replica_id: int = Field(sa_column=Column(Integer, ForeignKey("replicas.id"), primary_key=True))
    host_id: int = Field(sa_column=Column(Integer, ForeignKey("hosts.id"), nullable=False, index=True))
    gpus: str = Field(default="", max_length=255)
    """The GPU indices, comma-separated ("0,1"); empty for a replica that needs none."""
    engine_port: int
    placed_at: datetime = Field(default_factory=utcnow)
