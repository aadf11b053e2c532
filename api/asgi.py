"""The ASGI application built from the environment: what a server process (granian, uvicorn) imports.

Light to import: the app's own modules are imported by `app_from_env`, once a stop asked for meanwhile is held
(api/early_stop.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from api.early_stop import EarlyStop

if TYPE_CHECKING:
    from litestar.types import ASGIApp, Receive, Scope, Send


def app_from_env() -> ASGIApp:
    early = EarlyStop()
    early.hold()
    from api.app import create_app  # noqa: PLC0415 (after the hold: the bulk of a worker's start)
    from orchestrator.platform.logs import configure_logging  # noqa: PLC0415
    from orchestrator.platform.settings import Settings  # noqa: PLC0415
    from orchestrator.runtime.compose import Runtime, build_deps  # noqa: PLC0415

    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(Runtime(build_deps(settings)))

    async def served(scope: Scope, receive: Receive, send: Send) -> None:
        if early.held:  # the first call, the lifespan's: the server's own signal handlers are in place by now
            early.release()
        await app(scope, receive, send)

    return served
