"""The ASGI application built from the environment: what a server process (granian, uvicorn) imports."""

from __future__ import annotations

from litestar.types import ASGIApp

from api.app import create_app
from orchestrator.platform.logs import configure_logging
from orchestrator.platform.settings import Settings
from orchestrator.runtime.compose import Runtime, build_deps


def app_from_env() -> ASGIApp:
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    return create_app(Runtime(build_deps(settings)))
