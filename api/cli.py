"""The `orchestrator` command: serve the API, run the jobs as a worker, migrate the database."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import TYPE_CHECKING

import click

from orchestrator.platform.logs import configure_logging
from orchestrator.platform.settings import Settings

if TYPE_CHECKING:
    from orchestrator.platform.state_dir import ServerKeys

# The web stack and the database drivers are imported inside the commands that use them:
# `orchestrator --help` answers in a fraction of the time.


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """GPU replica orchestrator with an OpenAI-compatible gateway.

    Configured by ORCH_* environment variables (see the README); flags override them.
    """


@main.command()
@click.option("--host", default=None, help="Address to listen on [ORCH_HOST, default 127.0.0.1].")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Port [ORCH_PORT, default 8000].")
@click.option(
    "--no-scheduler", is_flag=True, help="Only serve: never lead the fleet's jobs (another instance or a worker does)."
)
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=None,
    help="HTTP worker processes [ORCH_WORKERS, default 1]; more than one needs ORCH_REDIS_URL.",
)
@click.option(
    "--server", type=click.Choice(["granian", "uvicorn"]), default=None, help="HTTP server [ORCH_SERVER, granian]."
)
def serve(host: str | None, port: int | None, no_scheduler: bool, workers: int | None, server: str | None) -> None:
    """Run the admin API, the gateway and (unless told not to) the jobs: the instance's own, and the fleet's while
    this instance leads."""
    from orchestrator.platform.state_dir import ensure_server_keys  # noqa: PLC0415

    # Flags become the environment the server process (and each of its workers) builds its settings from.
    for name, value in (("ORCH_HOST", host), ("ORCH_PORT", port), ("ORCH_SERVER", server), ("ORCH_WORKERS", workers)):
        if value is not None:
            os.environ[name] = str(value)
    if no_scheduler:
        os.environ["ORCH_LEAD"] = "false"
    settings = Settings()
    if settings.workers > 1 and not settings.redis_url:
        # Each worker would keep its own RPM windows, spend reservations and endpoint gates: N times the limits.
        raise click.UsageError(
            f"--workers {settings.workers} needs ORCH_REDIS_URL: without Redis each worker process would keep its "
            "own rate limits and spend reservations, so every key could use its limits once per worker"
        )
    configure_logging(settings.log_level, settings.log_format)
    _announce_admin_key(ensure_server_keys(settings))
    if settings.server == "granian":
        from granian.constants import Interfaces, Loops  # noqa: PLC0415
        from granian.server import Server  # noqa: PLC0415

        Server(
            "api.asgi:app_from_env",
            address=settings.host,
            port=settings.port,
            interface=Interfaces.ASGI,
            workers=settings.workers,
            loop=Loops.uvloop,
            factory=True,
            log_enabled=False,
            # A worker that dies (kill -9, the OOM killer) is started again, which replays the calls it journaled;
            # without this one worker's death stopped the whole server. One that dies again within seconds of its
            # restart stops it (granian's crash-loop guard).
            respawn_failed_workers=True,
        ).serve()
    else:
        import uvicorn  # noqa: PLC0415

        uvicorn.run(
            "api.asgi:app_from_env",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_config=None,
            access_log=False,
            server_header=False,
        )


@main.command()
def worker() -> None:
    """Run only the jobs, no HTTP listener: the instance's own, and the fleet's while this process leads (it
    competes for the lead with every `serve` that may lead). SIGTERM or SIGINT stop it cleanly."""
    from orchestrator.platform.state_dir import ensure_server_keys  # noqa: PLC0415

    os.environ["ORCH_SCHEDULER"] = "true"  # what a worker is for: ORCH_SCHEDULER and ORCH_LEAD cannot turn it off
    os.environ["ORCH_LEAD"] = "true"
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    _announce_admin_key(ensure_server_keys(settings))
    asyncio.run(_work(settings))


async def _work(settings: Settings) -> None:
    from orchestrator.runtime.compose import Runtime, build_deps  # noqa: PLC0415

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    runtime = Runtime(build_deps(settings))
    await runtime.start()
    try:
        await stopping.wait()
    finally:
        await runtime.stop()


def _announce_admin_key(keys: ServerKeys) -> None:
    # Straight to the terminal, never through logging: log lines must not carry secrets.
    if keys.generated_admin_key:
        click.echo(
            f"Generated the admin API key (shown this once): {keys.admin_api_key}\n"
            f"It is stored in {keys.admin_key_path} (mode 0600).",
            err=True,
        )
    elif keys.admin_key_path is not None:
        click.echo(f"Admin API key: in {keys.admin_key_path}", err=True)


@main.group()
def db() -> None:
    """Database maintenance."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply every pending migration (the server also does this at start)."""
    from orchestrator.store.db import make_engine, upgrade  # noqa: PLC0415

    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)

    async def run() -> str:
        engine = make_engine(settings.resolved_database_url)
        try:
            await upgrade(engine)
        finally:
            await engine.dispose()
        return engine.url.render_as_string(hide_password=True)

    click.echo(f"Database is at the newest schema: {asyncio.run(run())}")


def _add_engine_sim() -> None:
    from orchestrator.enginesim.server import engine_sim_command  # noqa: PLC0415

    main.add_command(engine_sim_command, "engine-sim")


_add_engine_sim()

if __name__ == "__main__":
    sys.exit(main())
