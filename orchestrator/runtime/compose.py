"""The composition root: builds the concrete objects from settings and owns start and stop."""

from __future__ import annotations

import dataclasses
import gc
import ipaddress
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy.ext.asyncio import AsyncEngine

from infra.hosts import HostBook, HostsBackend
from infra.machine import MachineBackend, MachineConfig
from infra.sandbox import SandboxBackend, SandboxConfig
from orchestrator import enginesim
from orchestrator.billing.accounts import AccountService
from orchestrator.billing.api_keys import ApiKeyService
from orchestrator.billing.history import CallRecordService
from orchestrator.billing.journal import Journal
from orchestrator.billing.ledger import Ledger, SharedLedger
from orchestrator.billing.records import CallRecord, CallRecords
from orchestrator.fleet.backend import VmBackend
from orchestrator.fleet.deployments import DeploymentKeeper, DeploymentService
from orchestrator.fleet.engine_load import EngineLoad, ObservedAutoscaler
from orchestrator.fleet.engine_plans import cloud_plans, host_plans, sandbox_plans
from orchestrator.fleet.health import HealthMonitor, HealthPolicy
from orchestrator.fleet.hosts import HostPlacer, HostService
from orchestrator.fleet.managed import ManagedPolicy, ManagedReplicas
from orchestrator.fleet.models import ModelService
from orchestrator.fleet.replicas import ReplicaService
from orchestrator.fleet.security_rules import ConnectionSources
from orchestrator.fleet.ssh_access import AccessPolicy, EngineAccess, PlanMaker
from orchestrator.gateway.catalog import Catalog
from orchestrator.gateway.flow import Gateway
from orchestrator.gateway.limits import SharedRpmLimiter
from orchestrator.gateway.priority import PriorityQueues
from orchestrator.gateway.upstream import Upstream
from orchestrator.platform.guarded_resolver import GuardedResolver
from orchestrator.platform.outbound import OutboundPolicy
from orchestrator.platform.redis_channel import RedisChannel
from orchestrator.platform.redis_flight import RedisFlight
from orchestrator.platform.redis_limits import RedisLimits
from orchestrator.platform.secrets import SecretBox
from orchestrator.platform.settings import Settings
from orchestrator.platform.state_dir import ServerKeys, ensure_server_keys
from orchestrator.runtime.container import Deps, Nudge
from orchestrator.runtime.jobs import add_leader_jobs, build_scheduler, remove_leader_jobs
from orchestrator.runtime.leader import Leadership, instance_id, lease_for, one_at_a_time
from orchestrator.runtime.metrics import ServerMetrics
from orchestrator.store.accounts import AccountStore
from orchestrator.store.api_keys import ApiKeyStore
from orchestrator.store.bots import BotStore
from orchestrator.store.browse import TableBrowser
from orchestrator.store.call_records import RecordStore
from orchestrator.store.db import make_engine, make_sessions, upgrade
from orchestrator.store.deployments import DeploymentStore
from orchestrator.store.external_endpoints import ExternalEndpointStore
from orchestrator.store.fleet import FleetStore
from orchestrator.store.gateway_view import GatewayViewStore
from orchestrator.store.hosts import HostStore
from orchestrator.store.notify import (
    CHECK_EVERY_S,
    CHECK_TIMEOUT_S,
    Change,
    ChangeFeed,
    Channel,
    PostgresChannel,
)
from orchestrator.store.tasks import TaskStore
from orchestrator.surfaces.feishu.bots import BotService
from orchestrator.surfaces.feishu.client import FeishuClient
from orchestrator.surfaces.feishu.receiver import FeishuReceiver
from orchestrator.surfaces.litellm.token_counter import TokenCounter
from orchestrator.surfaces.llmendpoint.tasks import TaskPolicy, TaskRunner
from orchestrator.surfaces.moonshot.endpoints import ExternalEndpointService
from orchestrator.surfaces.toolkit.tables import TableService

log = structlog.get_logger(__name__)

SWITCH_INTERVAL_S = 0.001
"""How long a thread may keep the interpreter lock while another waits for it, in a serving process."""


def _changes_channel(engine: AsyncEngine, settings: Settings, shared: RedisLimits | None) -> Channel | None:
    """Where the instances announce their changes: their PostgreSQL, or Redis between the workers of one machine on
    SQLite; nowhere for one process on SQLite."""
    if engine.dialect.name == "postgresql":
        return PostgresChannel(engine)
    if shared is not None and settings.redis_url is not None:
        return RedisChannel(
            settings.redis_url, shared.key("changes"), timeout_s=CHECK_TIMEOUT_S, check_every_s=CHECK_EVERY_S
        )
    return None


def build_deps(settings: Settings) -> Deps:
    keys = ensure_server_keys(settings)
    engine = make_engine(settings.resolved_database_url)
    sessions = make_sessions(engine)
    store = FleetStore(sessions)
    nudge, probe_nudge = Nudge(), Nudge()
    box = SecretBox(keys.secret_key)
    # ORCH_REDIS_URL: each key's requests per minute and a metered key's holds are counted over every instance.
    shared = None
    if settings.redis_url:  # a fee written stays counted until every instance has reloaded (the periodic net)
        written_ttl_s = 2 * settings.catalog_refresh_interval_s + 1
        shared = RedisLimits(settings.redis_url, namespace=settings.deployment, written_ttl_s=written_ttl_s)

    def unwritten(key_id: int) -> bool:  # the records, made below on this ledger
        return records.unwritten(key_id)

    # With Redis, a key's calls in flight or unwritten here are known to the others (`in_use` below asks them).
    ledger = Ledger() if shared is None else SharedLedger(shared, unwritten=unwritten)
    # A draining replica's last call ended: the reconcile job moves it on now.
    # ORCH_REDIS_URL: calls in flight per replica and endpoint gates are counted over every instance as well.
    flight = None if shared is None else RedisFlight(shared)
    catalog = Catalog(GatewayViewStore(sessions), box, ledger, on_drained=nudge, flight=flight)
    # Every change below is announced to the other instances before it reloads this one.
    changes = ChangeFeed(_changes_channel(engine, settings, shared), catalog.reload, nudge)
    moved = changes.made(Change.MOVES)
    outbound = OutboundPolicy.from_settings(settings)  # a bad ORCH_OUTBOUND_ALLOW_CIDRS stops the start here
    upstream = Upstream(resolver=GuardedResolver(outbound.allowed))  # names judged again at every connect
    record_store = RecordStore(sessions)
    records = CallRecords(
        record_store, ledger, Journal(settings.state_dir / "journal", CallRecord, fsync=settings.journal_fsync)
    )
    policy = HealthPolicy(
        starting_interval_s=settings.probe_starting_interval_s,
        ready_interval_s=settings.probe_ready_interval_s,
        unhealthy_after=settings.unhealthy_after,
        healthy_after=settings.healthy_after,
        startup_grace_s=settings.startup_grace_s,
        timeout_s=settings.probe_timeout_s,
    )
    health = HealthMonitor(store, upstream, box, policy, on_change=moved, wake=probe_nudge)
    backend, network, plans = build_backend(settings, keys)
    host_store = HostStore(sessions)
    # `hosts`: each replica is placed on a registered server first; the backend reads where from the placer's book.
    placer = None
    host_ports = range(settings.host_port_min, settings.host_port_max + 1)
    if isinstance(backend, HostsBackend):
        placer = HostPlacer(host_store, box, backend.book, host_ports)

    async def on_moved() -> None:
        await moved()
        nudge()
        probe_nudge()

    managed = ManagedReplicas(
        store,
        backend,
        box=box,
        network=network,
        access=EngineAccess(box, network, upstream, plans, AccessPolicy(foreign_ssh=placer is None)),
        pool=ThreadPoolExecutor(settings.provision_workers, thread_name_prefix="vm-work"),
        policy=ManagedPolicy(
            boot_deadline_s=settings.boot_deadline_s,
            max_recoveries=settings.max_recoveries,
            recover_after_s=settings.recover_after_s,
        ),
        on_moved=on_moved,
        placer=placer,
    )
    queues = PriorityQueues(catalog, slots=settings.queue_slots_per_replica, timeout_s=settings.queue_timeout_s)
    # The one callback set after construction: the queues are built on the catalog, which tells them of its reloads.
    catalog.on_reload = queues.wake_all
    gateway = Gateway(
        catalog,
        upstream,
        records,
        secret_key=keys.secret_key,
        admin_key=keys.admin_api_key,
        on_unreachable=health.report_unreachable,
        on_released=queues.wake,
        hold_tokens=settings.hold_tokens,
        limiter=None if shared is None else SharedRpmLimiter(shared),
    )

    async def in_use(key_id: int) -> bool:
        catalog.refuse(key_id)  # no call starts while this looks: one admitted meanwhile would lose its record
        await records.flush()
        if gateway.busy(key_id) or records.unwritten(key_id):
            return True
        # Another instance's calls of the key, in flight or unwritten (Redis out of reach: this instance's alone).
        return shared is not None and bool(shared.busy_elsewhere(key_id))

    bots = BotService(BotStore(sessions), box, keys.secret_key)
    metrics = ServerMetrics()
    # The gateway's queue waits count as the engines' own waiting calls, and the calls that found no READY replica
    # as unserved demand, which wakes a deployment at zero (its queued calls wait for the replica to start).
    engine_load = EngineLoad(
        store,
        upstream,
        box,
        queued=queues.waiting,
        unserved=catalog.take_unserved,
        timeout_s=settings.engine_load_timeout_s,
        on_scraped=metrics.engines_scraped,
    )
    replicas = ReplicaService(
        store,
        changes.wake,
        box,
        on_change=changes.made(Change.REPLICAS),
        network=network,
        ssh_port=backend.ssh_port,
        outbound=outbound,
    )
    # A deployment's replicas are made and drained through the replicas' service: the very checks and events.
    deployment_store = DeploymentStore(sessions)
    autoscaler = ObservedAutoscaler(on_decision=metrics.autoscale_decided)
    return Deps(
        settings=settings,
        keys=keys,
        engine=engine,
        store=store,
        nudge=nudge,
        probe_nudge=probe_nudge,
        box=box,
        catalog=catalog,
        changes=changes,
        upstream=upstream,
        records=records,
        record_store=record_store,
        call_records=CallRecordService(record_store),
        health=health,
        gateway=gateway,
        queues=queues,
        metrics=metrics,
        models=ModelService(store, changes.wake, on_change=changes.made(Change.MODELS)),
        replicas=replicas,
        deployments=DeploymentService(deployment_store, replicas, box, changes.wake),
        keeper=DeploymentKeeper(
            deployment_store,
            replicas,
            box,
            max_failed_starts=settings.deployment_max_failed_starts,
            autoscaler=autoscaler,
            load_of=lambda deployment, replica_ids: engine_load.load(deployment.model_id, replica_ids),
        ),
        api_keys=ApiKeyService(
            ApiKeyStore(sessions), keys.secret_key, on_change=changes.made(Change.KEYS), in_use=in_use
        ),
        tables=TableService(TableBrowser(sessions)),
        managed=managed,
        accounts=AccountService(
            AccountStore(sessions), ledger, keys.secret_key, on_change=changes.made(Change.ACCOUNTS)
        ),
        bots=bots,
        feishu_receiver=FeishuReceiver(bots, gateway, FeishuClient(settings.feishu_base_url)),
        external_endpoints=ExternalEndpointService(
            ExternalEndpointStore(sessions), box, on_change=changes.made(Change.ENDPOINTS), outbound=outbound
        ),
        tasks=TaskRunner(
            TaskStore(sessions),
            gateway,
            TaskPolicy(
                workers=settings.task_workers,
                max_attempts=settings.task_max_attempts,
                retry_after_s=settings.task_retry_after_s,
                host_wait_s=settings.task_host_wait_s,
            ),
        ),
        token_counter=TokenCounter(catalog, upstream),
        hosts=HostService(host_store, box, placer, host_ports),
        engine_load=engine_load,
        autoscaler=autoscaler,
        shared_limits=shared,
    )


def build_backend(settings: Settings, keys: ServerKeys) -> tuple[VmBackend, ConnectionSources, PlanMaker]:
    """The VM backend the settings name, the network it is reached over, and how its VMs run the engine."""
    if settings.infra_backend == "local":
        sandbox = SandboxBackend(
            SandboxConfig(
                root=settings.state_dir / "sandbox",
                subnet=settings.sandbox_subnet,
                ssh_port=settings.sandbox_ssh_port,
                enforce_rules=settings.sandbox_enforce_rules,
            )
        )
        # On loopback every connection comes from 127.0.0.1 unless bound: SSH binds 127.0.0.2 so the
        # rules can tell the orchestrator from the gateway, and SECURING binds 127.0.0.3 to connect as a stranger.
        network = ConnectionSources(
            orchestrator_cidr=settings.orchestrator_cidr or "127.0.0.2/32",
            gateway_cidr=settings.gateway_cidr or "127.0.0.1/32",
            ssh_source_address=settings.ssh_source_address or "127.0.0.2",
            foreign_source_address=settings.foreign_source_address or "127.0.0.3",
        )
        if ipaddress.ip_address(network.foreign_source_address or "") in ipaddress.ip_network(settings.sandbox_subnet):
            raise ValueError("ORCH_FOREIGN_SOURCE_ADDRESS must be outside ORCH_SANDBOX_SUBNET (a VM is no stranger)")
        return sandbox, network, sandbox_plans(sandbox.work_dir)
    if settings.infra_backend == "machine":
        return machine_backend(settings)
    if settings.infra_backend == "hosts":
        return hosts_backend(settings)
    from infra.hyperstack import HyperstackBackend, HyperstackConfig  # noqa: PLC0415 (Pulumi loads only when used)

    if not settings.orchestrator_cidr or not settings.gateway_cidr:
        raise ValueError("ORCH_INFRA_BACKEND=hyperstack needs ORCH_ORCHESTRATOR_CIDR and ORCH_GATEWAY_CIDR")
    if settings.hyperstack_api_key is None:
        raise ValueError("ORCH_INFRA_BACKEND=hyperstack needs HYPERSTACK_API_KEY")
    hyperstack = HyperstackBackend(
        HyperstackConfig(
            api_key=settings.hyperstack_api_key.get_secret_value(),
            base_url=settings.hyperstack_base_url,
            state_dir=settings.state_dir / "pulumi",
            passphrase=keys.secret_key,
            deployment=settings.deployment,
        )
    )
    network = ConnectionSources(
        settings.orchestrator_cidr,
        settings.gateway_cidr,
        settings.ssh_source_address,
        settings.foreign_source_address,  # a cloud VM seen from here: no stranger's address unless one is given
    )
    return hyperstack, network, cloud_plans()


def machine_backend(settings: Settings) -> tuple[VmBackend, ConnectionSources, PlanMaker]:
    # This host reaches the machines from addresses on its loopback: the gateway from the routes' source, SSH
    # from its own address, and SECURING's stranger from a third one.
    network = ConnectionSources(
        orchestrator_cidr=settings.orchestrator_cidr or "10.212.0.2/32",
        gateway_cidr=settings.gateway_cidr or "10.212.0.1/32",
        ssh_source_address=settings.ssh_source_address or "10.212.0.2",
        foreign_source_address=settings.foreign_source_address or "10.212.0.3",
    )
    gateway = str(ipaddress.ip_network(network.gateway_cidr, strict=False).network_address)
    machine = MachineBackend(
        MachineConfig(
            root=settings.state_dir / "machine",
            image_dir=settings.machine_image_dir,
            enginesim_dir=Path(enginesim.__file__).parent,
            site_packages=Path(sysconfig.get_paths()["purelib"]),
            subnet=settings.machine_subnet,
            keypairs_dir=settings.state_dir / "keypairs",
            host_address=gateway,
            local_addresses=tuple(a for a in (network.ssh_source_address, network.foreign_source_address) if a),
        )
    )
    return machine, network, cloud_plans()


def hosts_backend(settings: Settings) -> tuple[VmBackend, ConnectionSources, PlanMaker]:
    # The hosts are the admin's servers, reached over their own network: the CIDRs say where the orchestrator's SSH
    # and the gateway's calls come from, as on a cloud.
    if not settings.orchestrator_cidr or not settings.gateway_cidr:
        raise ValueError("ORCH_INFRA_BACKEND=hosts needs ORCH_ORCHESTRATOR_CIDR and ORCH_GATEWAY_CIDR")
    if settings.host_port_min > settings.host_port_max:
        raise ValueError("ORCH_HOST_PORT_MIN must not be above ORCH_HOST_PORT_MAX")
    network = ConnectionSources(
        settings.orchestrator_cidr,
        settings.gateway_cidr,
        settings.ssh_source_address,
        settings.foreign_source_address,
    )
    book = HostBook()
    return HostsBackend(book, source_address=settings.ssh_source_address), network, host_plans(book)


class Runtime:
    """What runs beside the HTTP server: migrations at start, the instance's own jobs, and the fleet's jobs while
    this instance leads (`orchestrator/runtime/leader.py`)."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self._scheduler: AsyncIOScheduler | None = None
        self._leadership: Leadership | None = None
        self._term: Deps | None = None
        """What the leader's jobs run with while this instance leads; None while it does not."""
        self._terms = 0

    @property
    def leading(self) -> bool:
        return self._leadership is not None and self._leadership.leading

    @property
    def term(self) -> Deps | None:
        """What the leader's jobs run with while this instance leads (None while it does not)."""
        return self._term

    def scheduled_jobs(self) -> set[str]:
        """The ids of the jobs this instance runs now."""
        return {job.id for job in self._scheduler.get_jobs()} if self._scheduler is not None else set()

    async def start(self) -> None:
        async with one_at_a_time(self.deps.engine, self.deps.settings.state_dir):  # workers starting together
            await upgrade(self.deps.engine)
        # Calls a crashed process answered but never wrote, before any account is read.
        await self.deps.records.replay()
        await self.deps.changes.start()  # listening before the first read: no change falls between the two
        await self.deps.catalog.reload()
        # What the process made to start (modules, the ORM's mappings, the apps: ~220,000 objects) lives as long as
        # it does: kept out of the collector's sight, or each full collection walks it all and holds the event loop
        # for 85-180 ms, which set the gateway's p99.
        gc.collect()
        gc.freeze()
        # The threads beside the event loop (the call journal's writer, whose fsync every answer waits for; the log
        # line writer; the server's own) each wait for the interpreter lock up to this long while the loop computes:
        # at Python's 5 ms a busy gateway's p99 at 32 concurrent calls was 38-42 ms, at 1 ms 25-30 ms, with the same
        # throughput (scripts/bench_gateway.py); shorter cost throughput.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        settings = self.deps.settings
        log.info(
            "orchestrator.started",
            database=self.deps.engine.url.render_as_string(hide_password=True),
            infra_backend=settings.infra_backend,
            scheduler=settings.scheduler,
            lead=settings.scheduler and settings.lead,
        )
        reason = getattr(self.deps.managed.backend, "not_enforced_reason", None)
        if reason is not None:
            log.warning(
                "sandbox.rules_not_enforced",
                reason=reason,
                consequence="sandbox security rules are recorded but NOT enforced: every port is open to anyone",
            )
        if not settings.scheduler:
            return
        self._scheduler = build_scheduler(self.deps, leading=False)
        self._scheduler.start()
        if settings.lead:
            identity = instance_id()
            self._leadership = Leadership(
                lease_for(self.deps.engine, settings.state_dir, identity, check_every_s=settings.lead_retry_s),
                identity=identity,
                on_acquired=self._lead,
                on_lost=self._follow,
                interval_s=settings.lead_retry_s,
            )
            await self._leadership.start()  # a lone instance leads from here, as before there were leaders

    async def _lead(self) -> None:
        # The first term runs on the services the API shares (a submitted task is claimed at once); a term after a
        # lost one gets fresh VM work and task runners, since stopping the last ones closed them for good.
        term = self.deps if self._terms == 0 else self._fresh_term()
        self._terms += 1
        # Only the leader: what a dead leader left `processing` is taken back, never what a live one runs.
        await term.tasks.recover()
        self._term = term
        assert self._scheduler is not None
        add_leader_jobs(self._scheduler, term)

    async def _follow(self) -> None:
        """The lead is gone (or being given back): no job of the leader's may run here a moment longer."""
        term, self._term = self._term, None
        if self._scheduler is not None:
            remove_leader_jobs(self._scheduler, self.deps)
        if term is not None:
            await term.tasks.close()  # calls cancelled, uncharged; their tasks go back to the queue
            await term.managed.close()  # VM work resumes from the stored status on the next leader

    def _fresh_term(self) -> Deps:
        deps, old = self.deps, self.deps.managed
        moved = deps.changes.made(Change.MOVES)

        async def on_moved() -> None:  # as the first term's: the other instances told, the jobs run again
            await moved()
            deps.nudge()
            deps.probe_nudge()

        managed = ManagedReplicas(
            old.store,
            old.backend,
            box=deps.box,
            network=old.network,
            access=old.access,
            pool=ThreadPoolExecutor(deps.settings.provision_workers, thread_name_prefix="vm-work"),
            policy=old.policy,
            on_moved=on_moved,
            placer=old.placer,
        )
        tasks = TaskRunner(deps.tasks.store, deps.gateway, deps.tasks.policy)
        return dataclasses.replace(deps, managed=managed, tasks=tasks)

    async def stop(self) -> None:
        await self.deps.feishu_receiver.close()  # the answers under way are cancelled (their calls still accounted for)
        if self._leadership is not None:
            await self._leadership.stop()  # the leader's jobs stop before the lease is given back
            self._leadership = None
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        await self.deps.tasks.close()  # calls cancelled, uncharged; their tasks run again at the next start
        await self.deps.managed.close()  # VM work resumes from the stored status at the next start
        try:
            await self.deps.records.flush()  # nothing recorded (nor any fee) is lost on a clean stop
        except Exception:
            log.exception("records.final_flush_failed")  # they stay in the journal, replayed at the next start
        self.deps.records.close()
        if self.deps.shared_limits is not None:
            self.deps.shared_limits.close()  # after the last flush, which gives its written fees back in Redis
        await self.deps.upstream.close()
        await self.deps.changes.stop()
        await self.deps.engine.dispose()
