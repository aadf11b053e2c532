"""The dependency bundle handed to the API and to every job."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator.billing.accounts import AccountService
from orchestrator.billing.api_keys import ApiKeyService
from orchestrator.billing.records import CallRecords
from orchestrator.fleet.health import HealthMonitor
from orchestrator.fleet.managed import ManagedReplicas
from orchestrator.fleet.models import ModelService
from orchestrator.fleet.replicas import ReplicaService
from orchestrator.gateway.catalog import Catalog
from orchestrator.gateway.flow import Gateway
from orchestrator.gateway.priority import PriorityQueues
from orchestrator.gateway.upstream import Upstream
from orchestrator.platform.secrets import SecretBox
from orchestrator.platform.settings import Settings
from orchestrator.platform.state_dir import ServerKeys
from orchestrator.runtime.metrics import ServerMetrics
from orchestrator.store.browse import TableBrowser
from orchestrator.store.call_records import RecordStore
from orchestrator.store.fleet import FleetStore
from orchestrator.surfaces.feishu.bots import BotService
from orchestrator.surfaces.feishu.client import FeishuClient
from orchestrator.surfaces.llmendpoint.tasks import TaskRunner
from orchestrator.surfaces.moonshot.endpoints import ExternalEndpointService


class Nudge:
    """Asks the reconcile job to run now instead of at its next tick; only a flag until a scheduler listens.

    The flag covers a nudge that arrives while the job is running (the scheduler will not start a second
    instance): the job takes it when it finishes and runs once more.
    """

    def __init__(self) -> None:
        self._target: Callable[[], None] | None = None
        self._requested = False

    def connect(self, target: Callable[[], None] | None) -> None:
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
    engine: AsyncEngine
    store: FleetStore
    tables: TableBrowser
    """The toolkit's table browser."""
    nudge: Nudge
    """Runs the reconcile job now."""
    probe_nudge: Nudge
    """Runs the probe job now."""
    box: SecretBox
    catalog: Catalog
    upstream: Upstream
    records: CallRecords
    """Gateway calls waiting to be written (with their sessions and fees)."""
    record_store: RecordStore
    """The calls as written: sessions and threads."""
    health: HealthMonitor
    gateway: Gateway
    queues: PriorityQueues
    """`/queue/chat/completions`: requests waiting, per model, for room on a replica."""
    metrics: ServerMetrics
    models: ModelService
    replicas: ReplicaService
    api_keys: ApiKeyService
    managed: ManagedReplicas
    accounts: AccountService
    """The connector's keys, recharges, groups and model bindings."""
    bots: BotService
    feishu: FeishuClient
    """The VM side of managed replicas, on the backend the settings chose."""
    external_endpoints: ExternalEndpointService
    """Moonshot's external endpoints, their tokens sealed."""
    tasks: TaskRunner
    """LlmEndpoint's durable queue of completions (`/api/v1/qcompletions`) and its runner."""
