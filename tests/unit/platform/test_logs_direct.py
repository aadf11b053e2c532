"""The request event's direct JSON line: the same keys, order and values as structlog's own rendering of the event,
at a fraction of its cost; left to structlog wherever the configuration is not the JSON one it copies."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import datetime

import pytest
import structlog

from orchestrator.platform.logs import REDACTED, configure_logging, flush_direct, info_direct


@pytest.fixture
def logs(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """Logging configured by each test itself: the handler binds the stderr of the phase it runs in."""
    yield capsys
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


def fields() -> dict[str, object]:
    return {"request_id": "r-1", "method": "POST", "path": '/v1/"odd"\n', "status": 200, "duration_ms": 1.25}


def both_ways(capsys: pytest.CaptureFixture[str]) -> tuple[dict[str, object], dict[str, object]]:
    """(structlog's line, the direct line) of the same event."""
    structlog.get_logger("api.request").info("request", **fields())
    assert info_direct("api.request", "request", fields())
    flush_direct()  # written by the log's own thread
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    slow, direct = (json.loads(line) for line in lines)
    return slow, direct


def same_but_time(slow: dict[str, object], direct: dict[str, object]) -> None:
    assert list(direct) == list(slow)  # the same keys in the same order
    stamps = [datetime.fromisoformat(str(line.pop("timestamp")).replace("Z", "+00:00")) for line in (slow, direct)]
    assert direct == slow
    assert stamps[0] <= stamps[1]
    assert str(stamps[1].tzinfo) == "UTC"


def test_the_direct_line_is_structlogs_line(logs: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "json")
    slow, direct = both_ways(logs)
    assert list(direct) == [
        *fields(), "event", "level", "logger", "timestamp"
    ]  # fmt: skip
    assert direct["path"] == '/v1/"odd"\n'
    same_but_time(slow, direct)


def test_bound_context_is_merged_and_redacted_as_structlog_does(logs: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "json")
    structlog.contextvars.bind_contextvars(job="records_flush", api_key="sk-bound", request_id="outer")
    slow, direct = both_ways(logs)
    assert direct["job"] == "records_flush"
    assert direct["api_key"] == REDACTED
    assert direct["request_id"] == "r-1"  # the event's own value wins, as with structlog
    same_but_time(slow, direct)


def test_console_format_is_left_to_structlog(logs: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "console")
    assert not info_direct("api.request", "request", fields())
    assert logs.readouterr().err == ""


def test_captured_logs_are_left_to_structlog(logs: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "json")
    with structlog.testing.capture_logs():
        assert not info_direct("api.request", "request", fields())
    assert info_direct("api.request", "request", fields())  # configured as before once the capture ends
    flush_direct()
    assert len(logs.readouterr().err.splitlines()) == 1


def test_lines_are_written_in_order_by_the_logs_thread(logs: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "json")
    for n in range(500):
        assert info_direct("api.request", "request", {**fields(), "status": n})
    flush_direct()
    assert [json.loads(line)["status"] for line in logs.readouterr().err.splitlines()] == list(range(500))


def test_another_handler_is_left_to_structlog(logs: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "json")
    logging.getLogger().addHandler(logging.NullHandler())
    assert not info_direct("api.request", "request", fields())
