"""Server-sent events as engines send them (vLLM's OpenAI server): `data: <JSON>` events, each ended by a blank line,
and a last `data: [DONE]`. The one reader of that framing, for the relay, the NDJSON relay and the call records.

Events are handled as bytes and never decoded here: the relay passes them through as they came, and only the
documents a caller asks for are parsed (by the caller, with its own msgspec type).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

EVENT_END: Final = b"\n\n"
DONE_EVENT: Final = b"data: [DONE]"
_DATA_DOCUMENT: Final = b"data: {"
_DATA: Final = len(b"data: ")


class EventReader:
    """Cuts a stream of bytes into whole events: `feed` takes what arrived and returns the events it completed, as
    one block (each event with its blank line), keeping the unfinished rest for the next call."""

    __slots__ = ("rest",)

    def __init__(self) -> None:
        self.rest = b""

    def feed(self, chunk: bytes) -> bytes:
        pending = self.rest + chunk
        if EVENT_END not in pending:
            self.rest = pending
            return b""
        complete, _, self.rest = pending.rpartition(EVENT_END)
        return complete + EVENT_END


def events(block: bytes) -> list[bytes]:
    """The events of a block of whole events, each without its blank line."""
    return block.split(EVENT_END)[:-1] if block.endswith(EVENT_END) else block.split(EVENT_END)


def document(event: bytes) -> bytes | None:
    """The JSON object an event carries (`data: {...}`), or None for any other event ([DONE], comments...)."""
    return event[_DATA:] if event.startswith(_DATA_DOCUMENT) else None


def documents(block: bytes) -> Iterator[bytes]:
    """The JSON objects of the events in `block`, in order."""
    for event in block.split(EVENT_END):
        if event.startswith(_DATA_DOCUMENT):
            yield event[_DATA:]
