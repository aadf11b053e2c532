"""The composition root: builds the concrete objects from settings and owns start and stop."""

from __future__ import annotations

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from orchestrator.catalog import Catalog
from orchestrator.crypto import SecretBox
from orchestrator.db import make_engine, make_sessions, upgrade
from orchestrator.deps import Deps, Nudge
from orchestrator.gateway import Gateway
from orchestrator.health import HealthMonitor, HealthPolicy
from orchestrator.metrics import Metrics
from orchestrator.scheduler import build_scheduler
from orchestrator.services.api_keys import ApiKeyService
from orchestrator.services.llm_models import ModelService
from orchestrator.services.replicas import ReplicaService
from orchestrator.settings import Settings
from orchestrator.state_dir import ensure_server_keys
from orchestrator.store import Store
from orchestrator.upstream import Upstream
from orchestrator.usage import UsageBuffer

log = structlog.get_logger(__name__)


def build_deps(settings: Settings) -> Deps:
    keys = ensure_server_keys(settings)
    engine = make_engine(settings.resolved_database_url)
    store = Store(make_sessions(engine))
    nudge, probe_nudge = Nudge(), Nudge()
    box = SecretBox(keys.secret_key)
    catalog = Catalog(store, box)
    upstream = Upstream()
    usage = UsageBuffer(store)
    policy = HealthPolicy(
        starting_interval_s=settings.probe_starting_interval_s,
        ready_interval_s=settings.probe_ready_interval_s,
        unhealthy_after=settings.unhealthy_after,
        healthy_after=settings.healthy_after,
        startup_grace_s=settings.startup_grace_s,
        timeout_s=settings.probe_timeout_s,
    )
    health = HealthMonitor(store, upstream, box, policy, on_change=catalog.reload, wake=probe_nudge)
    return Deps(
        settings=settings,
        keys=keys,
        engine=engine,
        store=store,
        nudge=nudge,
        probe_nudge=probe_nudge,
        box=box,
        catalog=catalog,
        upstream=upstream,
        usage=usage,
        health=health,
        gateway=Gateway(catalog, upstream, usage, keys.secret_key, on_unreachable=health.report_unreachable),
        metrics=Metrics(),
        models=ModelService(store, nudge, on_change=catalog.reload),
        replicas=ReplicaService(store, nudge, box, on_change=catalog.reload),
        api_keys=ApiKeyService(store, keys.secret_key, on_change=catalog.reload),
    )


class Runtime:
    """What runs beside the HTTP server: migrations at start, then the scheduler when enabled."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self._scheduler: AsyncIOScheduler | None = None

    async def start(self) -> None:
        await upgrade(self.deps.engine)
        await self.deps.catalog.reload()
        log.info(
            "orchestrator.started",
            database=self.deps.engine.url.render_as_string(hide_password=True),
            infra_backend=self.deps.settings.infra_backend,
            scheduler=self.deps.settings.scheduler,
        )
        if self.deps.settings.scheduler:
            self._scheduler = build_scheduler(self.deps)
            self._scheduler.start()

    async def stop(self) -> None:
        if self._scheduler is not None:
            self.deps.nudge.connect(None)
            self.deps.probe_nudge.connect(None)
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        try:
            await self.deps.usage.flush()  # nothing recorded is lost on a clean stop
        except Exception:
            log.exception("usage.final_flush_failed")
        await self.deps.upstream.close()
        await self.deps.engine.dispose()
