"""Records of gateway calls: kept in memory on the hot path as the raw bytes of the call (and appended to the
call journal, which has them on disk before the call's answer completes), and written in batches by a job, which
is where the texts are read out of those bytes, the sessions are summed and the fees are charged to their keys,
all in one transaction with the journal segments the batch came from (see `orchestrator.billing.journal`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import structlog

from orchestrator.billing.journal import Journal
from orchestrator.billing.ledger import Ledger
from orchestrator.domain.money import month_of
from orchestrator.platform.sse import documents
from orchestrator.store.call_records import BatchConflict, CallRow, Charge, RecordStore, SessionSum
from orchestrator.store.tables import storable

log = structlog.get_logger(__name__)

TITLE_CHARS = 30

CallKind = Literal["chat", "completions"]


@dataclass(slots=True)
class CallRecord:
    key_id: int | None
    """None: the server's admin key (a usage row, not a thread; nothing is charged)."""
    model: str
    kind: CallKind
    request: bytes
    answer: bytes | list[bytes]
    """The body of a whole answer, or the events of a stream as relayed."""
    stream: bool
    session: str | None
    created: float
    """Unix seconds."""
    duration: float
    first_byte: float | None
    replica_id: int | None
    """None: an external llm_endpoint served the call."""
    status: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    price_in: int
    price_out: int
    fee: int
    on_balance: bool = False
    """The fee is LlmEndpoint credits, taken off the balance alone."""


class CallRecords:
    def __init__(self, store: RecordStore, ledger: Ledger, journal: Journal | None = None) -> None:
        self._store = store
        self._ledger = ledger
        self._journal = journal
        """None: nothing is journaled (a call made since the last flush is lost on a crash)."""
        self._calls: list[CallRecord] = []
        self._forget: list[str] = []
        """Segments deleted after their batch was written: their marks go with the next batch."""
        self._flushing = asyncio.Lock()
        self._unsealed = False
        """Calls were journaled since the last seal (a flush retried while the database is down seals nothing new)."""
        self._sealing: asyncio.Future[str | None] | None = None
        """The last seal: awaited by every flush (shielded, so a flush cancelled meanwhile leaves it to the next)."""

    def add(self, call: CallRecord) -> asyncio.Future[None] | None:
        """Buffer a call; with a journal, the future is done once the call is on disk (await it before the answer
        completes). The buffer is not bounded: while the database is down, calls wait here and in the journal."""
        self._calls.append(call)
        if self._journal is None:
            return None
        self._unsealed = True
        return self._journal.append(call)

    def __len__(self) -> int:
        return len(self._calls)

    def close(self) -> None:
        """Stop journaling (at a clean stop, after the last flush: what it could not write stays on disk)."""
        if self._journal is not None:
            self._journal.close()

    def unwritten(self, key_id: int) -> bool:
        """Whether a call of the key is waiting to be written."""
        return any(c.key_id == key_id for c in self._calls)

    async def flush(self) -> int:
        """Write what is buffered; on failure the calls stay for the next flush and their fees stay pending."""
        async with self._flushing:  # the job, a key's deletion and the stop may ask at once
            if not self._calls:
                return 0
            calls, self._calls = self._calls, []
            try:
                segments = []
                if self._journal is not None:
                    if self._unsealed:  # synchronously: calls journaled after this go to the next segment
                        self._unsealed = False
                        self._sealing = self._journal.seal()
                    if self._sealing is not None:
                        await asyncio.shield(self._sealing)
                    segments = self._journal.sealed()
                await self._write(calls, segments)
            except BatchConflict:
                try:
                    calls = await self._after_lost_commit(calls, segments)
                finally:  # whatever that found (or not, if the database went away again), nothing is dropped
                    self._calls[:0] = calls
                raise
            except BaseException:  # failed or cancelled (shutdown): the calls wait for the next flush
                self._calls[:0] = calls
                raise
            if self._journal is not None:
                self._journal.discard(segments)
            self._forget = segments
            return len(calls)

    async def _after_lost_commit(self, calls: list[CallRecord], segments: list[str]) -> list[CallRecord]:
        """The calls still to write after a flush that failed on a segment's mark: an earlier batch was committed
        but its answer lost (a connection dropped at the commit), so its segments are written already. They are
        deleted and their fees settled; the calls of the others, read back from their segments, wait for the next
        flush (so a written call is never written twice, and the flush does not fail forever)."""
        assert self._journal is not None  # marks exist only with a journal
        done = [name for name in segments if await self._store.written(name)]
        if not done:
            return calls
        written = [c for name in done for c in self._journal.read(name)]
        _, _, charges = await _batched(written)
        async with self._ledger.lock:
            self._ledger.settle(((c.key_id, c.fee, c.on_balance) for c in charges), {})
        self._journal.discard(done)
        self._forget.extend(done)
        log.warning("records.lost_commit_found", segments=done, calls=len(written))
        return [c for name in segments if name not in done for c in self._journal.read(name)]

    async def replay(self) -> int:
        """Write the calls journaled by processes that are gone (a crash): each segment once. Run at start."""
        if self._journal is None:
            return 0
        replayed = 0
        async with self._flushing:
            for name in self._journal.orphans():
                try:
                    if await self._store.written(name):
                        calls = []
                    else:
                        calls = self._journal.read(name)
                        await self._write(calls, [name], settle=False)
                except Exception:  # the next start tries again
                    log.exception("journal.replay_failed", segment=name)
                    self._journal.release(name)
                    continue
                self._journal.discard([name])
                self._forget.append(name)
                replayed += len(calls)
                log.info("journal.replayed", segment=name, calls=len(calls))
        return replayed

    async def _write(self, calls: list[CallRecord], segments: list[str], *, settle: bool = True) -> None:
        rows, sessions, charges = await _batched(calls)
        async with self._ledger.lock:
            fresh = await self._store.write_calls(rows, sessions, charges, segments=segments, forget=self._forget)
            self._forget = []
            # A replayed call's fee was never pending here: only the accounts it left are news.
            self._ledger.settle(((c.key_id, c.fee, c.on_balance) for c in charges) if settle else (), fresh)


BATCH_SLICE = 100
"""Calls read per slice of a flush: about a millisecond of the event loop's time."""


async def _batched(calls: list[CallRecord]) -> tuple[list[CallRow], list[SessionSum], list[Charge]]:
    """A batch's rows, sessions and charges, read in slices with the event loop let go between them: a second's
    calls read in one go would hold it for tens of milliseconds, which set the gateway's p99."""
    batch = _Batch()
    for start in range(0, len(calls), BATCH_SLICE):
        if start:
            await asyncio.sleep(0)
        for call in calls[start : start + BATCH_SLICE]:
            batch.add(call)
    return batch.parts()


class _Batch:
    """The rows, sessions and charges of a batch of calls, built a call at a time."""

    __slots__ = ("_charges", "_rows", "_sessions")

    def __init__(self) -> None:
        self._rows: list[CallRow] = []
        self._sessions: dict[tuple[int, str], SessionSum] = {}
        self._charges: dict[tuple[int, int, bool], int] = {}

    def add(self, call: CallRecord) -> None:
        whole, last = map(storable, prompt_texts(call.kind, call.request))
        completion = storable(completion_text(call.answer))
        row = CallRow(
            session_key=call.session if call.key_id is not None else None,
            values={
                "api_key_id": call.key_id,
                "input": whole,
                "prompt": last,
                "choices": completion,
                "created": int(call.created),
                "model": call.model,
                "prompt_tokens": call.prompt_tokens,
                "completion_tokens": call.completion_tokens,
                "total_tokens": call.total_tokens,
                "duration": round(call.duration, 6),
                "first_byte_latency": None if call.first_byte is None else round(call.first_byte * 1000),
                "stream": call.stream,
                "replica_id": call.replica_id,
                "status_code": call.status,
                "price_in": call.price_in,
                "price_out": call.price_out,
                "fee": call.fee,
            },
        )
        self._rows.append(row)
        if call.key_id is None:
            return
        if call.fee:
            charge = (call.key_id, month_of(call.created), call.on_balance)
            self._charges[charge] = self._charges.get(charge, 0) + call.fee
        if row.session_key is not None:
            totals = self._sessions.get((call.key_id, row.session_key))
            if totals is None:
                totals = self._sessions[(call.key_id, row.session_key)] = SessionSum(call.key_id, row.session_key)
            totals.in_tokens += call.prompt_tokens
            totals.out_tokens += call.completion_tokens
            totals.fee += call.fee
            if not call.stream and call.status == 200 and completion:  # the connector's client titles this way
                totals.title = completion[:TITLE_CHARS]

    def parts(self) -> tuple[list[CallRow], list[SessionSum], list[Charge]]:
        ordered = [
            Charge(key_id, month, fee, on_balance)
            for (key_id, month, on_balance), fee in sorted(self._charges.items(), key=lambda i: i[0][1])
        ]
        return self._rows, list(self._sessions.values()), ordered


# -- the texts of a call, read from its bytes off the hot path ------------------------------------


class _Message(msgspec.Struct):
    content: Any = None


class _ChatRequest(msgspec.Struct):
    messages: list[msgspec.Raw] = []


class _CompletionRequest(msgspec.Struct):
    prompt: Any = None


class _Text(msgspec.Struct):
    content: Any = None


class _Choice(msgspec.Struct):
    index: int = 0
    message: _Text | None = None
    delta: _Text | None = None
    text: Any = None


class _Answer(msgspec.Struct):
    choices: list[_Choice] = []
    error: Any = None


_CHAT = msgspec.json.Decoder(_ChatRequest)
_COMPLETION = msgspec.json.Decoder(_CompletionRequest)
_MESSAGE = msgspec.json.Decoder(_Message)
_ANSWER = msgspec.json.Decoder(_Answer)


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return msgspec.json.encode(value).decode()


def prompt_texts(kind: CallKind, request: bytes) -> tuple[str | None, str | None]:
    """(the whole prompt as JSON, the last message's content) of a request body the gateway accepted."""
    try:
        if kind == "completions":
            prompt = _text(_COMPLETION.decode(request).prompt)
            return prompt, prompt
        messages = _CHAT.decode(request).messages
        if not messages:
            return None, None
        whole = b"[" + b",".join(bytes(m) for m in messages) + b"]"
        return whole.decode("utf-8", "replace"), _text(_MESSAGE.decode(messages[-1]).content)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None, None


def completion_text(answer: bytes | list[bytes]) -> str | None:
    """The first choice's text, from a whole answer or from the events of a stream."""
    if isinstance(answer, bytes):
        return _choice_text(answer, "message")
    parts: list[str] = []
    for chunk in answer:
        for document in documents(chunk):
            part = _choice_text(document, "delta")
            if part:
                parts.append(part)
    return "".join(parts) if parts else None


def relayed_tokens(answer: list[bytes]) -> int:
    """The completion tokens of a stream's relayed events, when the engine's usage never came: one per event
    carrying text (vLLM streams a token per event)."""
    tokens = 0
    for chunk in answer:
        for document in documents(chunk):
            try:
                choices = _ANSWER.decode(document).choices
            except (msgspec.DecodeError, UnicodeDecodeError):  # msgspec raises the latter for broken UTF-8
                continue
            tokens += sum(1 for c in choices if (c.delta.content if c.delta is not None else c.text))
    return tokens


def refused_in_stream(answer: list[bytes]) -> bool:
    """Whether a stream's events carry the engine's error (vLLM refuses some requests, too many logprobs, only
    after its 200: an error event, then `[DONE]`)."""
    for chunk in answer:
        for document in documents(chunk):
            try:
                if _ANSWER.decode(document).error is not None:
                    return True
            except (msgspec.DecodeError, UnicodeDecodeError):
                continue
    return False


def _choice_text(document: bytes, field: Literal["message", "delta"]) -> str | None:
    try:
        choices = _ANSWER.decode(document).choices
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    for choice in choices:
        if choice.index == 0:
            holder = getattr(choice, field)
            value = holder.content if holder is not None else choice.text
            return value if isinstance(value, str) else _text(value)
    return None
