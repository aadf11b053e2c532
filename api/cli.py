"""The `orchestrator` command: serve the API, migrate the database."""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING

import click

from orchestrator.logs import configure_logging
from orchestrator.settings import Settings

if TYPE_CHECKING:
    from orchestrator.state_dir import ServerKeys

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
@click.option("--no-scheduler", is_flag=True, help="Do not run the scheduled jobs in this process.")
def serve(host: str | None, port: int | None, no_scheduler: bool) -> None:
    """Run the admin API, the gateway and (unless told not to) the scheduler."""
    import uvicorn  # noqa: PLC0415

    from api.app import create_app  # noqa: PLC0415
    from orchestrator.bootstrap import Runtime, build_deps  # noqa: PLC0415

    overrides: dict[str, object] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    if no_scheduler:
        overrides["scheduler"] = False
    settings = Settings().model_copy(update=overrides)
    configure_logging(settings.log_level, settings.log_format)
    deps = build_deps(settings)
    _announce_admin_key(deps.keys)
    app = create_app(Runtime(deps))
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None, access_log=False, server_header=False
    )
    uvicorn.Server(config).run()


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
    from orchestrator.db import make_engine, upgrade  # noqa: PLC0415

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


if __name__ == "__main__":
    sys.exit(main())
