"""The sandbox backend a test's deps made its managed replicas on, cleaned up after the test: the replicas' steps
in flight settled, then every sandbox the test left behind destroyed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from infra.sandbox import SandboxBackend
from orchestrator.runtime.container import Deps


@asynccontextmanager
async def managed_sandbox(deps: Deps) -> AsyncIterator[SandboxBackend]:
    backend = deps.managed.backend
    assert isinstance(backend, SandboxBackend), "the deps were not built on the local sandbox backend"
    try:
        yield backend
    finally:
        await deps.managed.settle()
        for replica_id in backend.owned():  # whatever a failed test left behind
            backend.destroy(replica_id)
