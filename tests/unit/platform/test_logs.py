"""Log output: JSON off a TTY, secrets redacted, tracebacks without frame locals."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from orchestrator.platform.logs import REDACTED, configure_logging


@pytest.fixture
def json_logs(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """JSON logging, configured by each test itself: the handler binds the stderr of the phase it runs in."""
    yield capsys
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


def _lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_secret_sounding_fields_are_redacted(json_logs: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "json")
    structlog.get_logger("t").info("ev", api_key="sk-abc", authorization="Bearer x", api_key_id=7, user_id="u")
    [line] = _lines(json_logs)
    assert line["api_key"] == REDACTED
    assert line["authorization"] == REDACTED
    assert (line["api_key_id"], line["user_id"], line["event"]) == (7, "u", "ev")


def test_tracebacks_carry_no_frame_locals(json_logs: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "json")
    secret = "sk-" + "very-secret-value"  # built at run time: the source line shown must not contain it

    def fail(admin_api_key: str) -> None:
        raise ValueError("boom")

    try:
        fail(secret)
    except ValueError:
        structlog.get_logger("t").exception("failed")
    out = json_logs.readouterr().err
    assert "boom" in out
    assert "sk-very-secret-value" not in out


def test_stdlib_loggers_share_the_format(json_logs: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "json")
    logging.getLogger("uvicorn.error").info("started %s", "x")
    [line] = _lines(json_logs)
    assert (line["event"], line["logger"], line["level"]) == ("started x", "uvicorn.error", "info")
