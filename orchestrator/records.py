"""Records of gateway calls: kept in memory on the hot path as the raw bytes of the call, and written in
batches by a job, which is where the texts are read out of those bytes, the sessions are summed and the
fees are charged to their keys, all in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from orchestrator.billing import Ledger
from orchestrator.money import month_of
from orchestrator.record_store import CallRow, Charge, RecordStore, SessionSum
from orchestrator.tables import storable

MAX_BUFFERED = 100_000  # beyond this the database is down for long; keep the newest rather than grow forever
TITLE_CHARS = 30

Kind = Literal["chat", "completions"]


@dataclass(slots=True)
class CallRecord:
    key_id: int | None
    """None: the server's admin key (a usage row, not a thread; nothing is charged)."""
    model: str
    kind: Kind
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
    def __init__(self, store: RecordStore, ledger: Ledger) -> None:
        self._store = store
        self._ledger = ledger
        self._calls: list[CallRecord] = []

    def add(self, call: CallRecord) -> None:
        self._calls.append(call)
        if len(self._calls) > MAX_BUFFERED:
            del self._calls[: len(self._calls) - MAX_BUFFERED]

    def __len__(self) -> int:
        return len(self._calls)

    async def flush(self) -> int:
        """Write what is buffered; on failure the calls stay for the next flush and their fees stay pending."""
        if not self._calls:
            return 0
        calls, self._calls = self._calls, []
        try:
            rows, sessions, charges = _batch(calls)
            async with self._ledger.lock:
                fresh = await self._store.write_calls(rows, sessions, charges)
                self._ledger.settle(((c.key_id, c.fee, c.on_balance) for c in charges), fresh)
        except BaseException:  # failed or cancelled (shutdown): the calls wait for the next flush
            self._calls[:0] = calls
            raise
        return len(calls)


def _batch(calls: list[CallRecord]) -> tuple[list[CallRow], list[SessionSum], list[Charge]]:
    rows: list[CallRow] = []
    sessions: dict[tuple[int, str], SessionSum] = {}
    charges: dict[tuple[int, int, bool], int] = {}
    for call in calls:
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
        rows.append(row)
        if call.key_id is None:
            continue
        if call.fee:
            month = month_of(call.created)
            charge = (call.key_id, month, call.on_balance)
            charges[charge] = charges.get(charge, 0) + call.fee
        if row.session_key is not None:
            totals = sessions.get((call.key_id, row.session_key))
            if totals is None:
                totals = sessions[(call.key_id, row.session_key)] = SessionSum(call.key_id, row.session_key)
            totals.in_tokens += call.prompt_tokens
            totals.out_tokens += call.completion_tokens
            totals.fee += call.fee
            if not call.stream and call.status == 200 and completion:  # the connector's client titles this way
                totals.title = completion[:TITLE_CHARS]
    ordered = [
        Charge(key_id, month, fee, on_balance)
        for (key_id, month, on_balance), fee in sorted(charges.items(), key=lambda i: i[0][1])
    ]
    return rows, list(sessions.values()), ordered


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


_CHAT = msgspec.json.Decoder(_ChatRequest)
_COMPLETION = msgspec.json.Decoder(_CompletionRequest)
_MESSAGE = msgspec.json.Decoder(_Message)
_ANSWER = msgspec.json.Decoder(_Answer)


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return msgspec.json.encode(value).decode()


def prompt_texts(kind: Kind, request: bytes) -> tuple[str | None, str | None]:
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
        for event in chunk.split(b"\n\n"):
            if event.startswith(b"data: {"):
                part = _choice_text(event[6:], "delta")
                if part:
                    parts.append(part)
    return "".join(parts) if parts else None


def _choice_text(document: bytes, field: Literal["message", "delta"]) -> str | None:
    try:
        choices = _ANSWER.decode(document).choices
    except msgspec.DecodeError:
        return None
    for choice in choices:
        if choice.index == 0:
            holder = getattr(choice, field)
            value = holder.content if holder is not None else choice.text
            return value if isinstance(value, str) else _text(value)
    return None
