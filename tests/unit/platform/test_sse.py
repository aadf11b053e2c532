"""The one SSE reader: events cut whole out of any chunking, and the JSON documents among them."""

from __future__ import annotations

from orchestrator.platform.sse import EventReader, document, documents, events

A = b'data: {"choices":[{"delta":{"content":"a"}}]}'
B = b'data: {"choices":[],"usage":{"prompt_tokens":1}}'
STREAM = A + b"\n\n" + b": a comment\n\n" + B + b"\n\n" + b"data: [DONE]\n\n"


def test_events_come_out_whole_whatever_the_chunks() -> None:
    for size in (1, 2, 3, 7, 64, len(STREAM)):
        reader = EventReader()
        blocks = [reader.feed(STREAM[i : i + size]) for i in range(0, len(STREAM), size)]
        assert b"".join(blocks) == STREAM
        assert all(block == b"" or block.endswith(b"\n\n") for block in blocks)
        assert reader.rest == b""


def test_an_unfinished_event_waits_for_its_end() -> None:
    reader = EventReader()
    assert reader.feed(A + b"\n") == b""
    assert reader.rest == A + b"\n"
    assert reader.feed(b"\n" + B[:5]) == A + b"\n\n"
    assert reader.rest == B[:5]


def test_documents_are_the_data_objects_only() -> None:
    assert list(documents(STREAM)) == [A[6:], B[6:]]
    assert document(b"data: [DONE]") is None
    assert document(b": keep-alive") is None
    assert document(A) == A[6:]


def test_events_of_a_block_with_or_without_its_last_blank_line() -> None:
    assert events(A + b"\n\n" + B + b"\n\n") == [A, B]
    assert events(A + b"\n\n" + B) == [A, B]
