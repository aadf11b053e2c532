"""The dependency bundle handed to the API and to every job."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator.services.api_keys import ApiKeyService
from orchestrator.services.llm_models import ModelService
from orchestrator.services.replicas import ReplicaService
from orchestrator.settings import Settings
from orchestrator.state_dir import ServerKeys
from orchestrator.store import Store


class Nudge:
    """Asks the reconcile job to run now instead of at its next tick; a no-op until a scheduler listens."""

    def __init__(self) -> None:
        self._target: Callable[[], None] | None = None

    def connect(self, target: Callable[[], None] | None) -> None:
        self._target = target

    def __call__(self) -> None:
        if self._target is not None:
            self._target()


@dataclass(frozen=True)
class Deps:
    settings: Settings
    keys: ServerKeys
    engine: AsyncEngine
    store: Store
    nudge: Nudge
    models: ModelService
    replicas: ReplicaService
    api_keys: ApiKeyService
