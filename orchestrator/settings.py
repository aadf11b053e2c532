"""The one settings class: every knob the operator can turn, read from the environment once at start."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "orchestrator"


class Settings(BaseSettings):
    """Names are the public interface (`ORCH_*`); CLI flags override them."""

    model_config = SettingsConfigDict(env_prefix="ORCH_", extra="ignore", frozen=True)

    state_dir: Path = Field(default_factory=_default_state_dir)
    """Holds the SQLite file, the generated keys, sandbox dirs and Pulumi work dirs."""

    database_url: str | None = None
    """SQLAlchemy async URL; `None` means a SQLite file under `state_dir`."""

    admin_api_key: SecretStr | None = None
    """Bearer key of the admin API; generated into `state_dir` on first start when unset."""

    secret_key: SecretStr | None = None
    """Keys the HMAC of API keys and the encryption at rest; generated like the admin key."""

    log_format: Literal["auto", "json", "console"] = "auto"
    """`auto` is console on a TTY and JSON otherwise."""

    log_level: str = "INFO"

    infra_backend: Literal["local", "hyperstack"] = "local"
    """Where managed replicas get their VMs."""

    redis_url: str | None = None
    """Shared limits and counters when several instances run; in memory otherwise."""

    hyperstack_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("HYPERSTACK_API_KEY", "ORCH_HYPERSTACK_API_KEY")
    )
    hyperstack_base_url: str = "https://infrahub-api.nexgencloud.com/v1"

    server: Literal["granian", "uvicorn"] = "granian"
    """The HTTP server of `serve`; chosen by measurement (see the README's benchmarks)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)

    scheduler: bool = True
    """Run the jobs in this process (the embedded default); `serve --no-scheduler` turns it off."""

    reconcile_interval_s: float = Field(default=1.0, gt=0)

    probe_starting_interval_s: float = Field(default=2.0, ge=0)
    """How often a STARTING or UNHEALTHY replica is probed for readiness."""
    probe_ready_interval_s: float = Field(default=10.0, ge=0)
    """How often a READY replica's `/health` is checked."""
    unhealthy_after: int = Field(default=3, ge=1)
    healthy_after: int = Field(default=2, ge=1)
    startup_grace_s: float = Field(default=600.0, gt=0)
    """A replica STARTING for longer is a configuration error: terminated with reason `never_ready`."""
    probe_timeout_s: float = Field(default=5.0, gt=0)

    usage_flush_interval_s: float = Field(default=1.0, gt=0)
    catalog_refresh_interval_s: float = Field(default=5.0, gt=0)
    """Safety net for changes made by another instance; this instance's own changes apply at once."""

    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    """Largest request body the admin API reads; more is a 413."""

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.state_dir / 'orchestrator.db'}"
