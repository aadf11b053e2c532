"""The admin and secret keys of an instance under test, and its settings."""

from __future__ import annotations

from pathlib import Path

from orchestrator.platform.settings import Settings
from tests.support.sandbox import next_subnet

ADMIN_KEY = "sk-test-admin-key-0123456789"
SECRET_KEY = "test-secret-key-0123456789"


def instance_settings(state_dir: Path, database_url: str) -> Settings:
    """Settings of an instance under test: jobs run by the test itself, probes due at every run."""
    return Settings(
        state_dir=state_dir,
        database_url=database_url,
        admin_api_key=ADMIN_KEY,
        secret_key=SECRET_KEY,
        scheduler=False,  # tests call the jobs themselves
        log_format="console",
        # Every replica is due at every health.run(): tests probe by calling it, never by waiting.
        probe_ready_interval_s=0,
        probe_starting_interval_s=0,
        sandbox_subnet=next_subnet(),  # no two tests share a sandbox address or nft table
        recover_after_s=0,
    )
