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

    infra_backend: Literal["local", "machine", "hyperstack", "hosts"] = "local"
    """Where managed replicas get their VMs: `local` sandboxes (instant), `machine` (booted Debian machines, as
    root), `hyperstack` (GPU VMs on Hyperstack through Pulumi), `hosts` (GPU servers registered at
    `/api/v1/hosts`: no VM is made, each replica is placed on a host of its pool)."""
    host_port_min: int = Field(default=8100, ge=1024, le=65535)
    """`hosts` backend: the lowest engine port a replica placed on a host may get."""
    host_port_max: int = Field(default=8199, ge=1024, le=65535)
    """`hosts` backend: the highest (each host's firewall must let the gateway reach this range)."""

    sandbox_subnet: str = "127.77.0.0/16"
    """`local` backend: replica N's sandbox VM listens on the N-th address of this loopback subnet."""
    sandbox_ssh_port: int = Field(default=2222, ge=1, le=65535)
    """`local` backend: sshd's port on each sandbox address."""
    sandbox_enforce_rules: bool = True
    """`local` backend: enforce security rules with nftables (needs root and `nft`; else only recorded)."""

    machine_subnet: str = "10.213.0.0/16"
    """`machine` backend: replica N's machine owns the N-th /30 of it (this host's end of the veth, the machine)."""
    machine_image_dir: Path = Path("/var/cache/orchestrator/machine")
    """`machine` backend: the image cache, built once with debootstrap and shared by every state directory."""

    orchestrator_cidr: str | None = None
    """Where the orchestrator's SSH connections come from: the only source SSH is opened to.
    Default on `local`: 127.0.0.2/32 (SSH binds to it); on `machine`: 10.212.0.2/32; required on `hyperstack`."""
    gateway_cidr: str | None = None
    """Where the gateway's (and the prober's) connections to engines come from: the only source the engine
    port is opened to. Default on `local`: 127.0.0.1/32; on `machine`: 10.212.0.1/32; required on `hyperstack`."""
    ssh_source_address: str | None = None
    """Local address the orchestrator's SSH client binds to; default on `local`: 127.0.0.2; on `machine`: 10.212.0.2."""
    foreign_source_address: str | None = None
    """Local address outside both CIDRs (and the sandbox subnet) that SECURING connects from, as a stranger would,
    to prove SSH and the engine port refuse it. Default on `local`: 127.0.0.3; on `machine`: 10.212.0.3; none on
    `hyperstack` (then the
    replica's event says it was not probed from outside)."""

    boot_deadline_s: float = Field(default=600.0, gt=0)
    """How long a new VM may take to accept SSH with its pinned host key."""
    max_recoveries: int = Field(default=2, ge=0)
    """Engine restarts tried on an UNHEALTHY managed replica before it is terminated."""
    deployment_max_failed_starts: int = Field(default=3, ge=1)
    """Replicas of a deployment that may end in a row without ever being READY, or within 10 minutes of their first
    READY, before it makes no more (`failing`) until its template changes or an admin retries."""
    recover_after_s: float = Field(default=30.0, ge=0)
    """How long a managed replica stays UNHEALTHY (it may recover by itself) before the engine is restarted."""
    provision_workers: int = Field(default=32, ge=1)
    """Threads for blocking VM work (backend calls, SSH): how many replicas are provisioned at once."""
    rules_drift_interval_s: float = Field(default=30.0, gt=0)
    orphan_sweep_interval_s: float = Field(default=300.0, gt=0)

    redis_url: str | None = None
    """Shared limits and counters when several instances run; in memory otherwise."""

    outbound_allow_cidrs: str = ""
    """Comma-separated CIDRs that replica endpoints and llm_endpoint URIs may point into although they are
    link-local, unspecified, multicast or reserved (e.g. `169.254.10.0/24`). Never this server, its database or
    its Redis: no setting opens those."""

    hyperstack_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("HYPERSTACK_API_KEY", "ORCH_HYPERSTACK_API_KEY")
    )
    hyperstack_base_url: str = "https://infrahub-api.nexgencloud.com/v1"
    deployment: str = Field(default="default", pattern=r"^[a-z][a-z0-9-]{0,39}$")
    """This orchestrator deployment's name (1-40 of a-z, 0-9 and `-`, starting with a letter), for deployments that
    share one cloud account (staging and production): `hyperstack` labels its VMs with it, and each deployment's
    orphan sweep destroys only VMs labelled with its own name. VMs made before the label are `default`'s."""

    feishu_base_url: str = "https://open.feishu.cn"
    """Feishu's open API, where bots fetch their tenant tokens and post their replies (Lark: open.larksuite.com)."""

    server: Literal["granian", "uvicorn"] = "granian"
    """The HTTP server of `serve`; chosen by measurement (see the README's benchmarks)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)

    scheduler: bool = True
    """Run scheduled jobs in this process: the instance's own (records flush, catalog refresh) and, while it leads,
    the fleet's. Off only where the caller runs the jobs itself (tests); `serve --no-scheduler` turns off `lead`."""
    lead: bool = True
    """Compete to lead the fleet's jobs (reconcile, probes, sweeps, the task queue), which exactly one instance runs
    at a time: a PostgreSQL advisory lock, or a file lock beside a SQLite file. `serve --no-scheduler` turns it off
    (the instance only serves)."""
    lead_retry_s: float = Field(default=1.0, gt=0, le=60)
    """How often an instance that does not lead tries to, and the leader checks it still does."""
    workers: int = Field(default=1, ge=1, le=256)
    """`serve`: HTTP worker processes; more than one needs `redis_url` (limits must be shared between them)."""

    reconcile_interval_s: float = Field(default=1.0, gt=0)
    drain_timeout_s: float = Field(default=60.0, ge=0)
    """How long a DRAINING replica waits for the gateway's calls on it to end before it is torn down anyway."""

    probe_starting_interval_s: float = Field(default=2.0, ge=0)
    """How often a STARTING or UNHEALTHY replica is probed for readiness."""
    probe_ready_interval_s: float = Field(default=10.0, ge=0)
    """How often a READY replica's `/health` is checked."""
    unhealthy_after: int = Field(default=3, ge=1)
    healthy_after: int = Field(default=2, ge=1)
    startup_grace_s: float = Field(default=600.0, gt=0)
    """A replica STARTING for longer is a configuration error: terminated with reason `never_ready`."""
    probe_timeout_s: float = Field(default=5.0, gt=0)
    engine_load_interval_s: float = Field(default=3.0, gt=0, le=300)
    """How often the leader scrapes every READY replica's `/metrics` (requests running and waiting, KV-cache usage)
    for the autoscaler."""
    engine_load_timeout_s: float = Field(default=2.0, gt=0, le=60)
    """How long one replica's `/metrics` may take; a replica that does not answer in time has no load sample."""

    usage_flush_interval_s: float = Field(default=1.0, gt=0)
    journal_fsync: bool = True
    """Force each group of journaled calls to the disk before their answers complete. False keeps them safe from a
    killed process but not from a power loss, for about a millisecond less per call on a slow disk."""
    hold_tokens: int = Field(default=4096, ge=0, le=10_000_000)
    """Tokens held against a metered key's spend for a chat call that names no `max_tokens` (per output), and for
    each part of its messages that is not text (an image's tokens are not bounded by its bytes)."""
    catalog_refresh_interval_s: float = Field(default=5.0, gt=0)
    """Safety net for changes made by another instance; this instance's own changes apply at once."""
    queue_slots_per_replica: int = Field(default=8, ge=1, le=10_000)
    """`/queue/chat/completions`: calls a replica takes at once before queued requests wait for room."""
    queue_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    """How long a queued request waits for room before its 408 (a request's own `timeout` may be shorter)."""

    task_workers: int = Field(default=4, ge=1, le=1000)
    """`/api/v1/qcompletions`: queued completions this process runs at once."""
    task_interval_s: float = Field(default=1.0, gt=0)
    """How often the task job claims due tasks (submissions and finished tasks claim at once anyway)."""
    task_max_attempts: int = Field(default=3, ge=1)
    """Claims a queued completion may have: crashes and host failures count; past it the task fails."""
    task_retry_after_s: float = Field(default=5.0, gt=0)
    """How long a queued completion put back by a failed attempt waits before it is tried again."""
    task_host_wait_s: float = Field(default=300.0, ge=0)
    """How long after its submission a queued completion may wait for a host (or its key's rate limit)."""

    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    """Largest request body the admin API reads; more is a 413."""

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.state_dir / 'orchestrator.db'}"
