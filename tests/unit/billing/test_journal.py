"""The call journal: records come back as written, a torn tail is ignored, sealed segments hold exactly what was
appended before the seal, and only segments of processes that are gone are replayed."""

from __future__ import annotations

import asyncio
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from orchestrator.billing.journal import SUFFIX, Journal


@dataclass
class Rec:
    n: int
    body: bytes


async def test_sealed_segments_hold_what_came_before_the_seal(tmp_path: Path) -> None:
    journal = Journal(tmp_path, Rec)
    try:
        await asyncio.gather(*(journal.append(Rec(i, b"x" * i)) for i in range(5)))
        sealing = journal.seal()
        later = journal.append(Rec(99, b"later"))  # after the seal: the next segment
        first = await sealing
        await later
        assert journal.sealed() == [first]
        assert journal.read(first) == [Rec(i, b"x" * i) for i in range(5)]
        second = await journal.seal()
        assert journal.read(second) == [Rec(99, b"later")]
        journal.discard([first])
        assert not (tmp_path / first).exists()
        assert journal.sealed() == [second]
    finally:
        journal.close()


async def test_a_torn_tail_is_ignored(tmp_path: Path) -> None:
    journal = Journal(tmp_path, Rec)
    await journal.append(Rec(1, b"whole"))
    name = await journal.seal()
    journal.close()
    with (tmp_path / name).open("ab") as f:
        f.write(b"\x40\x00\x00\x00\x01\x02")  # a header and a few bytes: the crash came mid-write
    assert Journal(tmp_path, Rec).read(name) == [Rec(1, b"whole")]


async def test_only_segments_of_processes_that_are_gone_are_orphans(tmp_path: Path) -> None:
    alive, dead = tmp_path / f"1-a-00000001{SUFFIX}", tmp_path / f"2-b-00000001{SUFFIX}"
    alive.write_bytes(b"")
    dead.write_bytes(b"")
    holder = os.open(alive, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)  # as a live process holds its segments
    journal = Journal(tmp_path, Rec)
    try:
        assert journal.orphans() == [dead.name]
        journal.discard([dead.name])
        assert not dead.exists()
        assert alive.exists()
    finally:
        os.close(holder)
        journal.close()


async def test_a_disk_that_refuses_the_journal_never_holds_a_call(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_bytes(b"")
    journal = Journal(tmp_path / "not-a-dir" / "journal", Rec)  # every open fails: NotADirectoryError
    try:
        async with asyncio.timeout(5):  # each call is answered anyway (it is still in the record writer's buffer)
            await asyncio.gather(*(journal.append(Rec(i, b"")) for i in range(3)))
            assert await journal.seal() is None
            await journal.append(Rec(9, b"still served"))
    finally:
        journal.close()
