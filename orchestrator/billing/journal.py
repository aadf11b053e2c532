"""The call journal: every answered call, appended to a local file and fsynced before its answer completes, so
that a crash (kill -9, power off) between the answer and the next write of the records loses no call and no fee.

A process writes its calls to its own segment files under `<state dir>/journal/`, `<process id>-<seq>.seg`, each
held under an exclusive `flock` while the process lives. Records are framed as a 4-byte length, a 4-byte CRC-32
and a msgpack body; a torn tail (the crash came mid-write, so that call was never answered) is ignored on replay.

One writer thread does all the file work: it takes every record queued since its last write, writes them in one
go and fsyncs them once (group commit), then resolves their futures on the event loop. The record writer
(`billing.records`) seals the current segment when it takes its buffer, so a sealed segment holds exactly the
calls of one batch: the batch and the segment's name are committed in one transaction (`journal_segment`), and only
then is the file deleted. A segment found at start whose owner is gone (its lock is free) is replayed: written if
its name is not marked, deleted either way. So each call is written exactly once, whatever stops when.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import queue
import struct
import threading
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import structlog

log = structlog.get_logger(__name__)

SUFFIX = ".seg"
_HEADER = struct.Struct("<II")  # length, crc32
MAX_GROUP = 4096
"""At most this many records per write and fsync."""


@dataclass(slots=True)
class _Append:
    record: Any
    done: asyncio.Future[None]


@dataclass(slots=True)
class _Seal:
    done: asyncio.Future[str | None]


@dataclass(slots=True)
class _Segment:
    path: Path
    fd: int
    """Open (and flocked) until the segment's calls are written and it is discarded."""


@dataclass(slots=True)
class _State:
    sealed: dict[str, _Segment] = field(default_factory=dict)
    """This process's sealed segments not yet discarded, in the order they were sealed (the writer adds, the event
    loop removes: each name is touched by one side at a time)."""
    orphans: dict[str, _Segment] = field(default_factory=dict)
    """Dead processes' segments being replayed."""
    current: _Segment | None = None
    seq: int = 0


class Journal:
    """Appends records of type `record_type` (a msgspec-encodable dataclass or Struct) durably."""

    def __init__(self, directory: Path, record_type: type[Any], *, fsync: bool = True) -> None:
        self.directory = directory
        self._fsync = fsync
        """False: records are written (a killed process loses none) but not forced to the disk (a power loss or a
        kernel crash may)."""
        self._type = record_type
        self._prefix = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._encoder = msgspec.msgpack.Encoder()
        self._queue: queue.SimpleQueue[_Append | _Seal | None] = queue.SimpleQueue()
        self._state = _State()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- the event loop's side ------------------------------------------------------------------------

    def append(self, record: Any) -> asyncio.Future[None]:
        """Queue `record`; the future is done once it is on disk (or the disk refused it, which is logged)."""
        done = self._loop_now().create_future()
        self._queue.put(_Append(record, done))
        return done

    def seal(self) -> asyncio.Future[str | None]:
        """Close the current segment after every record appended so far (synchronously: whatever is appended
        after this call goes to the next segment); the future gives the sealed segment's name (None: there was
        nothing to seal, or the disk refused it)."""
        done = self._loop_now().create_future()
        self._queue.put(_Seal(done))
        return done

    def sealed(self) -> list[str]:
        """This process's sealed segments not yet discarded: once the last `seal` is done, their calls are exactly
        the calls the record writer has taken from its buffer and not yet written."""
        return list(self._state.sealed)

    def discard(self, names: list[str]) -> None:
        """Delete segments whose calls are written (their names marked in the same transaction)."""
        for name in names:
            segment = self._state.sealed.pop(name, None) or self._state.orphans.pop(name, None)
            if segment is None:
                continue
            segment.path.unlink(missing_ok=True)
            os.close(segment.fd)

    def close(self) -> None:
        """Stop the writer once it has written what is queued. Segments not discarded stay on disk: replayed at the
        next start."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._state.current is not None:
            os.close(self._state.current.fd)
            self._state.current = None
        for segments in (self._state.sealed, self._state.orphans):
            for segment in segments.values():
                os.close(segment.fd)
            segments.clear()

    def _loop_now(self) -> asyncio.AbstractEventLoop:
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            try:
                self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError:  # the writer says so at each write; serving goes on
                log.exception("journal.directory_failed", directory=str(self.directory))
            self._thread = threading.Thread(target=self._write, name="call-journal", daemon=True)
            self._thread.start()
        assert self._loop is not None
        return self._loop

    # -- replay of other (dead) processes' segments -------------------------------------------------

    def orphans(self) -> list[str]:
        """Segments of processes that are gone, oldest first, each locked by this process from now on: the caller
        replays each and then `discard`s it (or `release`s it to leave it for the next start)."""
        if not self.directory.is_dir():
            return []
        found: list[str] = []
        for path in sorted(self.directory.glob(f"*{SUFFIX}"), key=_order):
            if path.name.startswith(self._prefix):
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # another process replayed it meanwhile
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its process is alive
                os.close(fd)
                continue
            self._state.orphans[path.name] = _Segment(path, fd)
            found.append(path.name)
        return found

    def release(self, name: str) -> None:
        """Let go of an orphan without deleting it (its replay failed: the next start tries again)."""
        segment = self._state.orphans.pop(name, None)
        if segment is not None:
            os.close(segment.fd)

    def read(self, name: str) -> list[Any]:
        """The records of a segment, up to a torn tail."""
        data = (self.directory / name).read_bytes()
        decoder = msgspec.msgpack.Decoder(self._type)
        records: list[Any] = []
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, crc = _HEADER.unpack_from(data, offset)
            body = data[offset + _HEADER.size : offset + _HEADER.size + length]
            if len(body) < length or zlib.crc32(body) != crc:
                log.warning("journal.torn_tail", segment=name, at=offset, size=len(data))
                break
            records.append(decoder.decode(body))
            offset += _HEADER.size + length
        return records

    # -- the writer thread ----------------------------------------------------------------------------

    def _write(self) -> None:
        while True:
            first = self._queue.get()
            group = [first]
            while len(group) < MAX_GROUP:
                try:
                    group.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                if not self._write_group(group):
                    return
            except Exception:  # never die: a call waiting on this thread would wait forever
                log.exception("journal.writer_failed", items=len(group))
                self._resolve([item.done for item in group if item is not None and not item.done.done()], None)

    def _write_group(self, group: list[_Append | _Seal | None]) -> bool:
        """Write a group in order; returns False when told to stop."""
        frames: list[bytes] = []
        waiting: list[asyncio.Future[Any]] = []
        for item in group:
            if isinstance(item, _Append):
                body = self._encoder.encode(item.record)
                frames.append(_HEADER.pack(len(body), zlib.crc32(body)) + body)
                waiting.append(item.done)
                continue
            self._sync(frames, waiting)  # whatever came before a seal or the stop goes in first
            frames, waiting = [], []
            if item is None:
                return False
            self._resolve([item.done], self._seal_now())  # None: nothing was written since the last seal
        self._sync(frames, waiting)
        return True

    def _sync(self, frames: list[bytes], waiting: list[asyncio.Future[Any]]) -> None:
        """Write and fsync the frames, then let their calls answer. A disk that refuses them is logged and the calls
        answer anyway (they are still in the record writer's buffer): serving goes on, only crash safety is lost."""
        if not frames:
            return
        try:
            segment = self._current()
            os.write(segment.fd, b"".join(frames))
            if self._fsync:
                os.fdatasync(segment.fd)
        except OSError:
            log.exception("journal.write_failed", records=len(frames))
        self._resolve(waiting, None)

    def _current(self) -> _Segment:
        state = self._state
        if state.current is None:
            state.seq += 1
            path = self.directory / f"{self._prefix}-{state.seq:08d}{SUFFIX}"
            # Locked before it has its name: another process looking for orphans never sees it unlocked.
            hidden = path.with_suffix(".new")
            fd = os.open(hidden, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            hidden.rename(path)
            state.current = _Segment(path, fd)
        return state.current

    def _seal_now(self) -> str | None:
        """The current segment becomes sealed (None if there is none: nothing was written since the last seal)."""
        segment, self._state.current = self._state.current, None
        if segment is None:
            return None
        self._state.sealed[segment.path.name] = segment
        return segment.path.name

    def _resolve(self, waiting: list[asyncio.Future[Any]], value: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_set_all, waiting, value)


def _set_all(waiting: list[asyncio.Future[Any]], value: Any) -> None:
    for done in waiting:
        if not done.done():  # its waiter may have been cancelled
            done.set_result(value)


def _order(path: Path) -> tuple[float, str]:
    try:
        return (path.stat().st_mtime, path.name)
    except FileNotFoundError:  # gone meanwhile: skipped when opened
        return (0.0, path.name)
