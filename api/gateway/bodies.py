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


class _StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class _Message(msgspec.Struct):
    role: str
    content: Any = None


_Unit = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
_Temp = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
_Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
_Positive = Annotated[int, msgspec.Meta(ge=1)]


class _Common(msgspec.Struct):
    model: str = ""
    stream: bool = False
    stream_options: _StreamOptions | None = None
    temperature: _Temp | None = None
    top_p: _Unit | None = None
    frequency_penalty: _Penalty | None = None
    presence_penalty: _Penalty | None = None
    max_tokens: _Positive | None = None
    n: _Positive | None = None
    stop: str | list[str] | None = None


class _Chat(_Common):
    max_completion_tokens: _Positive | None = None
    messages: Annotated[list[_Message], msgspec.Meta(min_length=1)] = msgspec.field(default_factory=list)
    logprobs: bool | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None


class _Completion(_Common):
    prompt: str | list[Any] | None = None


COMPLETION_DEFAULT_MAX_TOKENS = 16
"""What OpenAI's (and vLLM's) legacy completions generate when `max_tokens` is not given."""

_CHAT = msgspec.json.Decoder(_Chat)
_COMPLETION = msgspec.json.Decoder(_Completion)
_AT = re.compile(r" - at `\$\.?([^`]*)`$")
_TOOLKIT_ROLES = frozenset({"system", "user", "assistant"})
_ROLES = _TOOLKIT_ROLES | {"tool", "developer", "function"}


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
    raw_stream: bool | None = None
    if toolkit and kind == "chat":
        raw_stream, raw = _toolkit_chat(raw)
    try:
        req: _Chat | _Completion = _CHAT.decode(raw) if kind == "chat" else _COMPLETION.decode(raw)
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
    if isinstance(req, _Chat):
        _check_chat(req, toolkit)
    elif req.prompt is None:
        raise BadBody("Missing required field: prompt", "prompt")
    model = path_model or req.model
    if not model:
        raise BadBody("Model must not be empty.", "model")
    wants_usage = bool(req.stream_options and req.stream_options.include_usage)
    changes: dict[str, Any] = {}
    if model != req.model:
        changes["model"] = model  # the path's model wins over the body's
    if req.stream and not wants_usage:
        changes["stream_options"] = {"include_usage": True}  # the gateway needs the usage of every call
    body = raw
    if changes:
        doc = _document(raw)
        doc.update(changes)
        body = msgspec.json.encode(doc)
    limit = (req.max_completion_tokens if isinstance(req, _Chat) else None) or req.max_tokens
    if limit is None and isinstance(req, _Completion):
        limit = COMPLETION_DEFAULT_MAX_TOKENS
    outputs = (req.n or 1) * (_prompts(req.prompt) if isinstance(req, _Completion) else 1)
    media = sum(_media(m.content) for m in req.messages) if isinstance(req, _Chat) else 0
    # The toolkit's streams never show the usage chunk (it has no choices); OpenAI-style clients get it if they asked.
    return Parsed(model, req.stream, wants_usage and not toolkit, body, limit, outputs, media, raw_stream)


def _toolkit_chat(raw: bytes) -> tuple[bool, bytes]:
    """A chat body checked field by field as the toolkit checks it: its `raw_stream_response` and what the replica
    gets (converted values, without `raw_stream_response`, usage asked for on a stream)."""
    try:
        chat = load_chat(_document(raw, any_json=True))
    except Invalid as e:
        errors = e.messages if isinstance(e.messages, dict) else {"_schema": e.messages}
        raise BadBody("Invalid request body.", errors=errors) from None
    return chat.raw_stream_response, msgspec.json.encode(chat.document)


def _prompts(prompt: str | list[Any] | None) -> int:
    """A completion's prompts: a list of strings (or of token lists) is one prompt each; a list of ints is one."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        return len(prompt)
    return 1


def _media(content: Any) -> int:
    """The parts of a message's content that are not text."""
    if not isinstance(content, list):
        return 0
    return sum(1 for part in content if not (isinstance(part, dict) and part.get("type") == "text"))


def _check_chat(req: _Chat, toolkit: bool) -> None:
    if not req.messages:
        raise BadBody("messages must be a non-empty list", "messages")
    roles = _TOOLKIT_ROLES if toolkit else _ROLES
    for i, message in enumerate(req.messages):
        if message.role not in roles:
            raise BadBody(f"Must be one of: {', '.join(sorted(roles))}.", f"messages.{i}.role")
    if req.top_logprobs is not None and not req.logprobs:
        raise BadBody("top_logprobs can only be set if logprobs is True", "top_logprobs")


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
