"""The engine simulator's request log: the last completion requests it received, and how many ran at once."""

from __future__ import annotations

import time
from collections import deque

import msgspec


class Entry:
    """One completion request; its body is kept as received (bytes) and decoded only when the log is read."""

    __slots__ = ("body", "finished", "path", "received")

    def __init__(self, path: str) -> None:
        self.received = time.time()
        self.finished: float | None = None  # None while the request runs
        self.path = path
        self.body = b""  # until the body was read; never the headers, which may hold keys


def _decoded(body: bytes) -> object:
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError:  # shown as text, as it came
        return body.decode(errors="replace")


class RequestLog:
    """A bounded log: the hot path appends one small object to a deque and counts; reading it does the rest."""

    def __init__(self, size: int) -> None:
        self.entries: deque[Entry] = deque(maxlen=size)
        self.running = 0
        self.peak_running = 0  # since start, or since the last clear

    def start(self, path: str) -> Entry:
        entry = Entry(path)
        self.entries.append(entry)
        self.running += 1
        self.peak_running = max(self.peak_running, self.running)
        return entry

    def finish(self, entry: Entry) -> None:
        entry.finished = time.time()
        self.running -= 1

    def clear(self) -> None:
        self.entries.clear()
        self.peak_running = self.running  # the requests still running are running at once after the clear too

    def render(self) -> bytes:
        requests = [
            {"received": e.received, "finished": e.finished, "path": e.path, "body": _decoded(e.body)}
            for e in self.entries
        ]
        return msgspec.json.encode({"requests": requests, "peak_running": self.peak_running})
