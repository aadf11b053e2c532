"""The sandbox backend a test's deps made its managed replicas on, cleaned up after the test (the replicas' steps
in flight settled, then every sandbox the test left behind destroyed), and the settings such a test runs on."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from infra.sandbox import SandboxBackend
from orchestrator.platform.settings import Settings
from orchestrator.runtime.container import Deps
from tests.support.settings import instance_settings


def sqlite_url(tmp_path: Path) -> str:
    """One database kind for a test whose subject is the fleet, not the store."""
    return f"sqlite+aiosqlite:///{tmp_path / 'orchestrator.db'}"


def sandbox_settings(tmp_path: Path, database_url: str) -> Settings:
    """An instance's settings on the local sandbox backend, whose rules need root (nftables; CI runs as root)."""
    assert os.geteuid() == 0, "the sandbox system tests need root for nftables (CI runs as root)"
    return instance_settings(tmp_path / "state", database_url)


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
