"""The container: every object the runtime built, handed to the API (which gives each route the services it uses)
and to every job."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator.billing.accounts import AccountService
from orchestrator.billing.api_keys import ApiKeyService
from orchestrator.billing.history import CallRecordService
from orchestrator.billing.records import CallRecords
from orchestrator.fleet.deployments import DeploymentKeeper, DeploymentService
from orchestrator.fleet.engine_load import EngineLoad, ObservedAutoscaler
from orchestrator.fleet.health import HealthMonitor
from orchestrator.fleet.hosts import HostService
from orchestrator.fleet.managed import ManagedReplicas
from orchestrator.fleet.models import ModelService
from orchestrator.fleet.replicas import ReplicaService
from orchestrator.gateway.catalog import Catalog
from orchestrator.gateway.flow import Gateway
from orchestrator.gateway.priority import PriorityQueues
from orchestrator.gateway.upstream import Upstream
from orchestrator.platform.redis_limits import RedisLimits
from orchestrator.platform.secrets import SecretBox
from orchestrator.platform.settings import Settings
from orchestrator.platform.state_dir import ServerKeys
from orchestrator.runtime.metrics import ServerMetrics
from orchestrator.store.call_records import RecordStore
from orchestrator.store.fleet import FleetStore
from orchestrator.store.notify import ChangeFeed
from orchestrator.surfaces.feishu.bots import BotService
from orchestrator.surfaces.feishu.receiver import FeishuReceiver
from orchestrator.surfaces.litellm.token_counter import TokenCounter
from orchestrator.surfaces.llmendpoint.tasks import TaskRunner
from orchestrator.surfaces.moonshot.endpoints import ExternalEndpointService
from orchestrator.surfaces.toolkit.tables import TableService


class Nudge:
    """Asks a job to run now instead of at its next tick; only a flag until a scheduler listens.

    The flag covers a nudge that arrives while the job is running (the scheduler will not start a second
    instance): the job takes it when it finishes and runs once more.

    The scheduler is connected after construction, and this cannot be helped: the services are built with their
    nudge, the jobs are built on those services, and the scheduler exists only once the runtime starts (and never
    where the jobs do not run).
    """

    def __init__(self) -> None:
        self._target: Callable[[], None] | None = None
        self._requested = False

    def connect(self, target: Callable[[], None] | None) -> None:
        """Who runs the job now (None: nobody, the scheduler is gone)."""
        self._target = target

    def __call__(self) -> None:
        self._requested = True
        if self._target is not None:
            self._target()

    def take(self) -> bool:
        requested, self._requested = self._requested, False
        return requested


@dataclass(frozen=True)
class Deps:
    settings: Settings
    keys: ServerKeys
    """The admin API key and the secret key (API-key hashes, the secret box)."""
    engine: AsyncEngine
    store: FleetStore
    """The fleet's models and replicas, as the jobs read and move them."""
    nudge: Nudge
    """Runs the reconcile job now."""
    probe_nudge: Nudge
    """Runs the probe job now."""
    box: SecretBox
    catalog: Catalog
    """The gateway's memory: keys, models, the replicas and endpoints serving each, the ledger."""
    changes: ChangeFeed
    """Every instance on one PostgreSQL told of the others' changes at once: each change announced, the others'
    heard (the catalog reloads, the reconcile job is nudged)."""
    upstream: Upstream
    records: CallRecords
    """Gateway calls waiting to be written (with their sessions and fees)."""
    record_store: RecordStore
    """The calls as written: sessions and threads."""
    call_records: CallRecordService
    """The connector's chat records (sessions and threads), read back."""
    health: HealthMonitor
    gateway: Gateway
    queues: PriorityQueues
    """`/queue/chat/completions`: requests waiting, per model, for room on a replica."""
    metrics: ServerMetrics
    models: ModelService
    replicas: ReplicaService
    deployments: DeploymentService
    """Models' deployments, as an admin sets them."""
    keeper: DeploymentKeeper
    """Keeps each deployment's replicas: the reconcile job's first step, on the leader."""
    api_keys: ApiKeyService
    """The toolkit's client keys."""
    tables: TableService
    """The toolkit's table browser."""
    managed: ManagedReplicas
    """The VM side of managed replicas, on the backend the settings chose."""
    accounts: AccountService
    """The connector's keys, recharges, groups and model bindings."""
    bots: BotService
    """The connector's chat bots, their secrets sealed."""
    feishu_receiver: FeishuReceiver
    """The bots' Feishu events: taken once, answered through the gateway, replied to through Feishu."""
    external_endpoints: ExternalEndpointService
    """Moonshot's external endpoints, their tokens sealed."""
    tasks: TaskRunner
    """LlmEndpoint's durable queue of completions (`/api/v1/qcompletions`) and its runner."""
    token_counter: TokenCounter
    """LiteLLM's `/utils/token_counter`: by a replica of the model, or by OpenAI's rule."""
    hosts: HostService
    """The GPU servers registered at `/api/v1/hosts`, on which the `hosts` backend places replicas."""
    engine_load: EngineLoad
    """The READY replicas' engines' `/metrics`, scraped by the leader's `engine_load` job, and each model's load."""
    autoscaler: ObservedAutoscaler
    """The deployments' autoscaling decisions (their delays' memory), logged and counted in the metrics."""
    shared_limits: RedisLimits | None = None
    """With ORCH_REDIS_URL: the limits and holds every instance counts together (closed at the stop, so that this
    instance's holds end at once rather than when its liveness key expires)."""
