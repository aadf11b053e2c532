"""The toolkit's chat request schema: every field accepted, converted and refused as the Hyperstack toolkit's
marshmallow schema does, with its errors in marshmallow's shape.

Errors nest by field, list index and mapping key (`{"messages": {"0": {"role": ["Must be one of: ..."]}}}`); a union
that no candidate takes lists each candidate's errors; a body that is not an object is `{"_schema": [...]}`. Unknown
fields are refused, at every level. The checks of the whole request run only once every field passed. What a field
converts is what the engine gets ("5" is 5, 1.5 tokens is 1, "yes" is true); fields the client left out stay out
(the toolkit's own defaults, such as temperature 1, would change what the engine does by default).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Messages = list[Any] | dict[str, Any]


class Invalid(Exception):
    def __init__(self, messages: Messages) -> None:
        super().__init__(messages)
        self.messages = messages


_MISSING = "Missing data for required field."
_NULL = "Field may not be null."
_TRUTHY = frozenset({"t", "T", "true", "True", "TRUE", "on", "On", "ON", "y", "Y", "yes", "Yes", "YES", "1", 1})
_FALSY = frozenset({"f", "F", "false", "False", "FALSE", "off", "Off", "OFF", "n", "N", "no", "No", "NO", "0", 0})

Check = Callable[[Any], str | None]
"""A validator on a converted value: the message when it fails, None when it passes."""


def one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else f"Must be one of: {', '.join(choices)}."


def equal(other: str) -> Check:
    return lambda v: None if v == other else f"Must be equal to {other}."


def in_range(low: float, high: float | None = None) -> Check:
    """Inclusive bounds, worded as marshmallow words them (the bounds as written: 0.0 stays 0.0)."""
    message = f"Must be greater than or equal to {low}" + (
        "." if high is None else f" and less than or equal to {high}."
    )
    if high is None:
        return lambda v: None if v >= low else message
    return lambda v: None if low <= v <= high else message


def min_length(n: int) -> Check:
    return lambda v: None if len(v) >= n else f"Shorter than minimum length {n}."


@dataclass(frozen=True)
class Field:
    """A field: `convert` turns a present, non-null value into what is loaded (or raises Invalid)."""

    convert: Callable[[Any], Any]
    checks: tuple[Check, ...] = ()
    required: bool = False

    def load(self, value: Any) -> Any:
        if value is None:
            raise Invalid([_NULL])
        out = self.convert(value)
        for check in self.checks:
            if (message := check(out)) is not None:
                raise Invalid([message])
        return out


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid(["Not a valid string."])
    return value


def _integer(value: Any) -> int:
    if isinstance(value, bool):
        raise Invalid(["Not a valid integer."])
    try:
        return int(value)
    except (TypeError, ValueError):
        raise Invalid(["Not a valid integer."]) from None
    except OverflowError:
        raise Invalid(["Number too large."]) from None


def _float(value: Any) -> float:
    if isinstance(value, bool):
        raise Invalid(["Not a valid number."])
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise Invalid(["Not a valid number."]) from None
    except OverflowError:
        raise Invalid(["Number too large."]) from None
    if math.isnan(number) or math.isinf(number):
        raise Invalid(["Special numeric values (nan or infinity) are not permitted."])
    return number


def _boolean(value: Any) -> bool:
    try:
        if value in _TRUTHY:
            return True
        if value in _FALSY:
            return False
    except TypeError:  # a list or an object: not hashable, not a boolean
        pass
    raise Invalid(["Not a valid boolean."])


def _raw(value: Any) -> Any:
    return value


def string(*checks: Check, required: bool = False) -> Field:
    return Field(_string, checks, required)


def integer(*checks: Check) -> Field:
    return Field(_integer, checks)


def number(*checks: Check) -> Field:
    return Field(_float, checks)


def boolean() -> Field:
    return Field(_boolean)


def raw(*, required: bool = False) -> Field:
    return Field(_raw, (), required)


def mapping(values: Field | None = None) -> Field:
    def convert(value: Any) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            raise Invalid(["Not a valid mapping type."])
        if values is None:
            return dict(value)
        out, errors = {}, {}
        for key, item in value.items():
            try:
                out[key] = values.load(item)
            except Invalid as e:
                errors[key] = {"value": e.messages}
        if errors:
            raise Invalid(errors)
        return out

    return Field(convert)


def listing(item: Field, *checks: Check, required: bool = False) -> Field:
    def convert(value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise Invalid(["Not a valid list."])
        out, errors = [], {}
        for i, element in enumerate(value):
            try:
                out.append(item.load(element))
            except Invalid as e:
                errors[str(i)] = e.messages
        if errors:
            raise Invalid(errors)
        return out

    return Field(convert, checks, required)


def union(*candidates: Field) -> Field:
    """The first candidate that takes the value; when none does, every candidate's errors, in order."""

    def convert(value: Any) -> Any:
        errors: list[Any] = []
        for candidate in candidates:
            try:
                return candidate.load(value)
            except Invalid as e:
                errors.append(e.messages)
        raise Invalid(errors)

    return Field(convert)


@dataclass(frozen=True)
class Schema:
    fields: dict[str, Field]
    checks: tuple[Callable[[dict[str, Any]], dict[str, list[str]]], ...] = field(default=())
    """Checks of the whole document, run once every field passed: each returns its errors by field."""

    def load(self, data: Any) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise Invalid({"_schema": ["Invalid input type."]})
        out: dict[str, Any] = {}
        errors: dict[str, Any] = {}
        for name, spec in self.fields.items():
            if name not in data:
                if spec.required:
                    errors[name] = [_MISSING]
                continue
            try:
                out[name] = spec.load(data[name])
            except Invalid as e:
                errors[name] = e.messages
        errors.update({name: ["Unknown field."] for name in data if name not in self.fields})
        if not errors:
            for check in self.checks:
                for name, messages in check(out).items():
                    errors.setdefault(name, []).extend(messages)
        if errors:
            raise Invalid(errors)
        return out

    def nested(self, *, required: bool = False) -> Field:
        return Field(self.load, (), required)


# -- the chat request -----------------------------------------------------------------------------------------------


def _model_given(doc: dict[str, Any]) -> dict[str, list[str]]:
    return {} if doc.get("model") else {"model": ["Model must not be empty."]}


def _top_logprobs(doc: dict[str, Any]) -> dict[str, list[str]]:
    top = doc.get("top_logprobs")
    if top is None:
        return {}
    if not doc.get("logprobs"):
        return {"top_logprobs": ["top_logprobs can only be set if logprobs is True"]}
    if not 0 <= top <= 20:
        return {"top_logprobs": ["Must be greater than or equal to 0 and less than or equal to 20."]}
    return {}


def _stop(doc: dict[str, Any]) -> dict[str, list[str]]:
    stop = doc.get("stop")
    if stop is not None and not isinstance(stop, str | list):
        return {"stop": ["stop must be either a string or a list of strings"]}
    if isinstance(stop, list) and any(not isinstance(s, str) for s in stop):
        return {"stop": ["All elements in the stop list must be strings"]}
    return {}


_FUNCTION = Schema({"name": string(required=True), "description": string(), "parameters": mapping()})
_NAMED_TOOL = Schema({"function": _FUNCTION.nested(required=True), "type": string(equal("function"), required=True)})
_MESSAGE = Schema(
    {
        "role": string(one_of("system", "user", "assistant"), required=True),
        "content": raw(required=True),
        "extra_field": string(),
    }
)

CHAT_REQUEST = Schema(
    {
        "messages": listing(_MESSAGE.nested(), min_length(1), required=True),
        "model": string(required=True),
        "max_tokens": integer(in_range(1)),
        "n": integer(in_range(1)),
        "stop": raw(),
        "frequency_penalty": number(in_range(-2.0, 2.0)),
        "presence_penalty": number(in_range(-2.0, 2.0)),
        "temperature": number(in_range(0.0, 2.0)),
        "stream": boolean(),
        "stream_options": Schema({"include_usage": boolean()}).nested(),
        "logit_bias": mapping(integer(in_range(-100, 100))),
        "logprobs": boolean(),
        "top_logprobs": integer(),
        "top_p": number(in_range(0.0, 1.0)),
        "seed": integer(),
        "response_format": Schema({"type": string(one_of("text", "json_object"), required=True)}).nested(),
        "tool_choice": union(string(one_of("none", "auto", "required")), _NAMED_TOOL.nested()),
        "tools": listing(_NAMED_TOOL.nested()),
        "user": string(),
        "function_call": union(string(one_of("none", "auto")), _NAMED_TOOL.nested()),
        "functions": listing(_FUNCTION.nested()),
        "guided_json": mapping(),
        "guided_decoding_backend": string(),
        "guided_choice": listing(string()),
        "guided_regex": string(),
        "raw_stream_response": boolean(),
    },
    checks=(_model_given, _top_logprobs, _stop),
)
"""The toolkit's `ChatCompletionRequestSchema`."""


@dataclass(frozen=True)
class ToolkitChat:
    document: dict[str, Any]
    """What the engine gets: the converted fields, less `raw_stream_response`; a stream asks for usage, and
    `stream_options` is dropped from a request that does not stream."""
    raw_stream_response: bool
    """How a stream is answered: SSE events (the default), or each event's bare JSON on a line of its own."""


def load_chat(data: Any) -> ToolkitChat:
    """The toolkit's chat request, as its route reads it; Invalid with marshmallow's errors otherwise."""
    doc = CHAT_REQUEST.load(data)
    raw_stream = doc.pop("raw_stream_response", True)
    if doc.get("stream"):
        doc["stream_options"] = {"include_usage": True}
    else:
        doc.pop("stream_options", None)
    return ToolkitChat(doc, raw_stream)
