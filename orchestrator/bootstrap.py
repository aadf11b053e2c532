"""The composition root: builds the concrete objects from settings and owns start and stop."""

from __future__ import annotations

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from orchestrator.db import make_engine, make_sessions, upgrade
from orchestrator.deps import Deps, Nudge
from orchestrator.scheduler import build_scheduler
from orchestrator.services.api_keys import ApiKeyService
from orchestrator.services.llm_models import ModelService
from orchestrator.services.replicas import ReplicaService
from orchestrator.settings import Settings
from orchestrator.state_dir import ensure_server_keys
from orchestrator.store import Store

log = structlog.get_logger(__name__)


def build_deps(settings: Settings) -> Deps:
    keys = ensure_server_keys(settings)
    engine = make_engine(settings.resolved_database_url)
    store = Store(make_sessions(engine))
    nudge = Nudge()
    return Deps(
        settings=settings,
        keys=keys,
        engine=engine,
        store=store,
        nudge=nudge,
        models=ModelService(store, nudge),
        replicas=ReplicaService(store, nudge),
        api_keys=ApiKeyService(store, keys.secret_key),
    )


class Runtime:
    """What runs beside the HTTP server: migrations at start, then the scheduler when enabled."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self._scheduler: AsyncIOScheduler | None = None

    async def start(self) -> None:
        await upgrade(self.deps.engine)
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
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        await self.deps.engine.dispose()
