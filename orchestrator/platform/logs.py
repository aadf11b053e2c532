"""Logging: structlog for our events, and the same format for every stdlib logger (uvicorn, alembic...)."""

from __future__ import annotations

import atexit
import collections
import contextvars
import logging
import os
import sys
import threading
import time
from collections.abc import MutableMapping
from datetime import UTC, datetime
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


class _Direct:
    """Where `info_direct` writes: the JSON handler and the processor list `configure_logging` installed."""

    handler: logging.StreamHandler[Any] | None = None
    processors: list[Any] = []


_STRUCTLOG_PREFIX = "structlog_"  # the names of structlog's context variables (`structlog.contextvars`)


def info_direct(logger: str, event: str, fields: dict[str, Any]) -> bool:
    """Write an INFO event exactly as the JSON configuration renders it (the same keys in the same order: the
    fields, `event`, the bound context, `level`, `logger`, `timestamp`), without structlog's processor chain and the
    two stdlib records it makes: about a tenth of the cost, for the request event written on every gateway call.
    Returns False, having written nothing, where this is not that configuration (console format, another handler,
    logs captured by a test): the caller then logs the usual way. The caller checks the level first."""
    handler = _Direct.handler
    processors = _Direct.processors
    if handler is None or logging.root.handlers != [handler] or processors[-1] is not _WRAP:
        return False
    fields["event"] = event
    bound = False
    for var, value in contextvars.copy_context().items():  # as merge_contextvars does
        if var.name.startswith(_STRUCTLOG_PREFIX) and value is not Ellipsis:
            fields.setdefault(var.name[len(_STRUCTLOG_PREFIX) :], value)
            bound = True
    fields["level"] = "info"
    fields["logger"] = logger
    fields["timestamp"] = _iso_now()
    if bound:  # only a bound value can be unknown here
        redact_secrets(None, "", fields)
    _lines.put(handler, _encoder.encode(fields).decode() + "\n")
    return True


class _LineWriter:
    """Writes `info_direct`'s lines from a thread of its own: a write to a log file (or a pipe) that stalls, on a
    disk's writeback or a reader that lags, holds that thread and never the event loop. Lines keep their order;
    those still queued are written at exit (`flush`), and within milliseconds otherwise."""

    def __init__(self) -> None:
        self._queue: collections.deque[tuple[logging.StreamHandler[Any], str]] = collections.deque()
        self._wake = threading.Event()
        self._done = threading.Condition()
        self._taken = 0
        self._written = 0
        self._pid = 0

    def put(self, handler: logging.StreamHandler[Any], line: str) -> None:
        if self._pid != os.getpid():  # first use, or a forked worker (threads do not survive a fork)
            self._pid = os.getpid()
            self._queue.clear()
            self._taken = self._written = 0
            threading.Thread(target=self._run, name="log-lines", daemon=True).start()
            atexit.register(self.flush)
        self._taken += 1
        self._queue.append((handler, line))
        self._wake.set()

    def flush(self, timeout_s: float = 5.0) -> None:
        """Return once every line put so far is written (or after `timeout_s`)."""
        taken = self._taken
        with self._done:
            self._done.wait_for(lambda: self._written >= taken, timeout_s)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            taken = 0
            while self._queue:
                handler, line = self._queue.popleft()
                lines = [line]
                while self._queue and self._queue[0][0] is handler:  # written together, to the same stream
                    lines.append(self._queue.popleft()[1])
                taken += len(lines)
                self._write(handler, "".join(lines))
            with self._done:
                self._written += taken
                self._done.notify_all()

    @staticmethod
    def _write(handler: logging.StreamHandler[Any], text: str) -> None:
        try:
            with handler.lock:  # type: ignore[union-attr]  # created by Handler.__init__
                handler.stream.write(text)
                handler.stream.flush()
        except (OSError, ValueError):  # a stream closed or failing: as logging does, the lines are dropped
            handler.handleError(logging.makeLogRecord({"msg": "request log lines lost"}))


_lines = _LineWriter()


def flush_direct() -> None:
    """Wait until every line `info_direct` took is written (tests read them; a stopping server writes them)."""
    _lines.flush()


_WRAP = structlog.stdlib.ProcessorFormatter.wrap_for_formatter
_second: tuple[int, str] = (-1, "")
"""The last whole second `_iso_now` formatted, and its text (replaced whole: safe from any thread)."""


def _iso_now() -> str:
    """Now, as structlog's ISO UTC timestamper writes it (`datetime.isoformat`, `Z` for UTC), the second's text
    made once per second."""
    global _second  # noqa: PLW0603  (a cache of one value)
    now = time.time()
    second = int(now)
    cached, text = _second
    if second != cached:
        text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second = (second, text)
    micro = int((now - second) * 1_000_000)
    return f"{text}.{micro:06d}Z" if micro else f"{text}Z"


def configure_logging(level: str = "INFO", fmt: str = "auto") -> None:
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    # Level first: an event below the level costs one check, not a pass through every processor.
    processors = [structlog.stdlib.filter_by_level, *shared, _WRAP]
    structlog.configure(
        processors=processors,
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
    # capture_logs() (tests) changes this very list in place, which `info_direct` sees.
    _Direct.handler, _Direct.processors = (handler, processors) if as_json else (None, [])
    root.setLevel(level.upper())
    # Interval jobs would log every second; our own request events replace the access log.
    for noisy in ("apscheduler.executors.default", "uvicorn.access", "httpx", "alembic.runtime.plugins"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # "skipped: maximum number of running instances reached" is expected when a nudge meets a running job.
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
