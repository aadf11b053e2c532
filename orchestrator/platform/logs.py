"""Logging: structlog for our events, and the same format for every stdlib logger (uvicorn, alembic...)."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import msgspec
import structlog

_SECRET_WORDS = ("authorization", "api_key", "apikey", "secret", "token", "password")
REDACTED = "[redacted]"


def redact_secrets(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Defence in depth: a string value under a secret-sounding key never reaches a log line."""
    for key, value in event.items():
        lowered = key.lower()
        if isinstance(value, str) and not lowered.endswith("_id") and any(w in lowered for w in _SECRET_WORDS):
            event[key] = REDACTED
    return event


_encoder = msgspec.json.Encoder(enc_hook=str)


def _dumps(event: Any, **_: Any) -> str:
    """msgspec instead of json.dumps: the request event is written once per gateway call."""
    return _encoder.encode(event).decode()


def configure_logging(level: str = "INFO", fmt: str = "auto") -> None:
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    structlog.configure(
        # Level first: an event below the level costs one check, not a pass through every processor.
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if as_json
        else structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
    )
    # Never render frame locals: they hold keys and request headers.
    tail: list[Any] = (
        [structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False))]
        if as_json
        else []
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    # Interval jobs would log every second; our own request events replace the access log.
    for noisy in ("apscheduler.executors.default", "uvicorn.access", "httpx", "alembic.runtime.plugins"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # "skipped: maximum number of running instances reached" is expected when a nudge meets a running job.
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
