"""The VM backend a test's deps made their managed replicas on (the local sandbox, or booted machines), cleaned up
after the test (the replicas' steps in flight settled, then every VM the test left behind destroyed), and the
settings a sandbox test runs on."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import TypeVar

from infra.machine import MachineBackend
from infra.sandbox import SandboxBackend
from orchestrator.platform.settings import Settings
from orchestrator.runtime.container import Deps
from tests.support.settings import instance_settings

Backend = TypeVar("Backend", SandboxBackend, MachineBackend)


def sqlite_url(tmp_path: Path) -> str:
    """One database kind for a test whose subject is the fleet, not the store."""
    return f"sqlite+aiosqlite:///{tmp_path / 'orchestrator.db'}"


def sandbox_settings(tmp_path: Path, database_url: str) -> Settings:
    """An instance's settings on the local sandbox backend, whose rules need root (nftables; CI runs as root)."""
    assert os.geteuid() == 0, "the sandbox system tests need root for nftables (CI runs as root)"
    return instance_settings(tmp_path / "state", database_url)


@asynccontextmanager
async def managed_backend(deps: Deps, kind: type[Backend]) -> AsyncIterator[Backend]:
    """The VM backend (sandbox or machine) the deps made their managed replicas on, whatever a test leaves of it
    destroyed afterwards: the replicas' steps in flight settled first."""
    backend = deps.managed.backend
    assert isinstance(backend, kind), f"the deps were not built on the {kind.__name__}"
    try:
        yield backend
    finally:
        await deps.managed.settle()
        for replica_id in backend.owned():  # whatever a failed test left behind
            backend.destroy(replica_id)


def managed_sandbox(deps: Deps) -> AbstractAsyncContextManager[SandboxBackend]:
    return managed_backend(deps, SandboxBackend)
