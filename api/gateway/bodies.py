"""Request bodies of the gateway: parsed with msgspec, only the fields the gateway needs or must check.

The bytes the client sent are what the replica gets, unless the gateway must change them (the model named
in the path, usage asked for on a stream); then the body is re-encoded once. The toolkit's route checks every
field first, as the toolkit does (`api.gateway.toolkit_schema`), and always sends what that check loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from api.gateway.toolkit_schema import Invalid, load_chat
from orchestrator.billing.records import CallKind


class BadBody(Exception):
    def __init__(self, message: str, param: str | None = None, errors: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.errors = errors
        """Every error of the body by field, in marshmallow's shape (the toolkit's route); None: only `message`."""


class _Body(msgspec.Struct):
    """What the gateway reads of a chat or completion body. Only `model` and `stream` must be right for it to
    route the call; the rest bounds the call's worst case when it makes sense, and is the engine's to judge."""

    model: str = ""
    stream: bool = False
    stream_options: Any = None
    max_tokens: Any = msgspec.UNSET
    """UNSET: not given (a completion then makes 16 tokens); null asks for as many as the context leaves."""
    max_completion_tokens: Any = None
    n: Any = None
    messages: Any = None
    prompt: Any = None


COMPLETION_DEFAULT_MAX_TOKENS = 16
"""What OpenAI's (and vLLM's) legacy completions generate when `max_tokens` is not given."""

_BODY = msgspec.json.Decoder(_Body)
_AT = re.compile(r" - at `\$\.?([^`]*)`$")


@dataclass(slots=True, frozen=True)
class Parsed:
    model: str
    stream: bool
    client_wants_usage: bool
    body: bytes
    """What to send upstream."""
    max_tokens: int | None
    """The most tokens each output may have (`max_completion_tokens` or `max_tokens`); None: not said."""
    outputs: int = 1
    """How many outputs the answer has: `n`, times the prompts of a completion given a list of them."""
    media: int = 0
    """Parts of the messages that are not text (images, audio...): their tokens are not bounded by their bytes."""
    raw_stream_response: bool | None = None
    """The toolkit's route: a stream as SSE events (True) or as bare JSON lines (False); None on other routes."""


def parse(raw: bytes, kind: CallKind, *, path_model: str | None, toolkit: bool) -> Parsed:
    """The body's model, stream and bounds. The values the engine takes or refuses (sampling, lengths, roles,
    logprobs...) are not judged here, so that a client sees the engine's own answer: vLLM's words and shape."""
    raw_stream: bool | None = None
    if toolkit and kind == "chat":
        raw_stream, raw = _toolkit_chat(raw)
    try:
        req = _BODY.decode(raw)
    except msgspec.ValidationError as e:
        message = str(e)
        found = _AT.search(message)
        raise BadBody(_AT.sub("", message), found.group(1) if found else None) from e
    except msgspec.DecodeError as e:
        raise BadBody(f"Invalid JSON body: {e}") from e
    except UnicodeDecodeError as e:  # msgspec raises it for a string that is not UTF-8
        raise BadBody(f"Invalid JSON body: not UTF-8 ({e.reason})") from e
    except RecursionError as e:
        raise BadBody("Invalid JSON body: nested too deeply") from e
    model = path_model or req.model
    if not model:
        raise BadBody("Model must not be empty.", "model")
    options = req.stream_options
    # vLLM's `stream_options` asks for usage unless it says otherwise (`include_usage` defaults to true there).
    wants_usage = isinstance(options, dict) and options.get("include_usage", True) is True
    changes: dict[str, Any] = {}
    if model != req.model:
        changes["model"] = model  # the path's model wins over the body's
    if req.stream and not wants_usage and (options is None or isinstance(options, dict)):
        # The gateway needs the usage of every call. Usage in every chunk (continuous_usage_stats) only comes with
        # include_usage, which this client did not ask for: it is left out, and the client sees no usage as from
        # the engine.
        kept = {k: v for k, v in (options or {}).items() if k != "continuous_usage_stats"}
        changes["stream_options"] = {**kept, "include_usage": True}
    body = raw
    if changes:
        doc = _document(raw)
        doc.update(changes)
        body = msgspec.json.encode(doc)
    chat = kind == "chat"
    limit = (_count(req.max_completion_tokens) if chat else None) or _count(req.max_tokens)
    if req.max_tokens is msgspec.UNSET and not chat:
        limit = COMPLETION_DEFAULT_MAX_TOKENS
    outputs = (_count(req.n) or 1) * (1 if chat else _prompts(req.prompt))
    media = (
        sum(_media(m.get("content")) for m in req.messages if isinstance(m, dict))
        if chat and isinstance(req.messages, list)
        else 0
    )
    # The toolkit's streams never show the usage chunk (it has no choices); OpenAI-style clients get it if they asked.
    return Parsed(model, req.stream, wants_usage and not toolkit, body, limit, outputs, media, raw_stream)


def _count(value: Any) -> int | None:
    """A positive count as an engine reads one (vLLM takes 2, 2.0 and "2"); None for anything else, which the
    engine refuses or reads as not given."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.isascii() and value.strip().isdigit() and len(value) < 20:
        value = int(value)
    return value if isinstance(value, int) and value > 0 else None


def _toolkit_chat(raw: bytes) -> tuple[bool, bytes]:
    """A chat body checked field by field as the toolkit checks it: its `raw_stream_response` and what the replica
    gets (converted values, without `raw_stream_response`, usage asked for on a stream)."""
    try:
        chat = load_chat(_document(raw, any_json=True))
    except Invalid as e:
        errors = e.messages if isinstance(e.messages, dict) else {"_schema": e.messages}
        raise BadBody("Invalid request body.", errors=errors) from None
    return chat.raw_stream_response, msgspec.json.encode(chat.document)


def _prompts(prompt: Any) -> int:
    """A completion's prompts: a list of strings (or of token lists) is one prompt each; a list of ints is one."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        return len(prompt)
    return 1


def _media(content: Any) -> int:
    """The parts of a message's content that are not text."""
    if not isinstance(content, list):
        return 0
    return sum(1 for part in content if not (isinstance(part, dict) and part.get("type") == "text"))


def _document(body: bytes, *, any_json: bool = False) -> Any:
    """The whole body as a dict, to change it: its unknown fields are read now, which the typed decode skipped
    (`any_json`: whatever JSON value it is, for the toolkit's schema to judge)."""
    try:
        doc = msgspec.json.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError) as e:
        raise BadBody(f"Invalid JSON body: {type(e).__name__}") from e
    if not any_json and not isinstance(doc, dict):
        raise BadBody("Invalid JSON body: not an object")
    return doc


def with_fields(body: bytes, **fields: Any) -> bytes:
    """The body with fields set (another model named: a connector key's unknown model falls back to "default")."""
    doc = _document(body)
    doc.update(fields)
    return msgspec.json.encode(doc)


_Priority = Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31 - 1)]
_Timeout = Annotated[float, msgspec.Meta(gt=0, le=3600)]


class _QueueFields(msgspec.Struct):
    priority: _Priority = 0
    timeout: _Timeout | None = None


_QUEUE_FIELDS = msgspec.json.Decoder(_QueueFields)


@dataclass(slots=True, frozen=True)
class Queued:
    priority: int
    """Lower goes first."""
    timeout_s: float | None
    body: bytes
    """The body without the queue's own fields (an engine would refuse `priority` it does not schedule by)."""


def queue_fields(body: bytes) -> Queued:
    """`priority` and `timeout` of a `/queue/chat/completions` body (a body `parse` already accepted)."""
    try:
        fields = _QUEUE_FIELDS.decode(body)
    except msgspec.ValidationError as e:
        message = str(e)
        found = _AT.search(message)
        raise BadBody(_AT.sub("", message), found.group(1) if found else None) from e
    doc = _document(body)
    doc.pop("priority", None)
    doc.pop("timeout", None)
    return Queued(fields.priority, fields.timeout, msgspec.json.encode(doc))
