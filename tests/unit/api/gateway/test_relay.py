"""Usage read off a stream on the way through: the usage-only chunk, other chunks, malformed ones."""

from __future__ import annotations

from api.gateway.relay import _take_usage, usage_of
from orchestrator.gateway.flow import Usage

TOKEN = b'data: {"choices":[{"index":0,"delta":{"content":" a"}}],"usage":null}'
USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}'
DONE = b"data: [DONE]"


def test_usage_chunk_is_dropped_unless_asked_for() -> None:
    events = b"\n\n".join([TOKEN, USAGE, DONE])
    kept, usage = _take_usage(events, keep=False)
    assert usage == Usage(3, 2, 5)
    assert kept == TOKEN + b"\n\n" + DONE + b"\n\n"
    kept, usage = _take_usage(events, keep=True)
    assert usage == Usage(3, 2, 5)
    assert kept == events + b"\n\n"


def test_malformed_event_passes_through_untouched() -> None:
    broken = b'data: {"usage":{"prompt_tokens":'
    kept, usage = _take_usage(broken, keep=False)
    assert (kept, usage) == (broken + b"\n\n", None)


def test_usage_of_a_whole_answer() -> None:
    assert usage_of(b'{"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}') == Usage(1, 2, 3)
    assert usage_of(b'{"usage":null}') is None
    assert usage_of(b"not json") is None
