"""The engine simulator's request bodies, read as vLLM's OpenAI server reads them, and the refusals of bad ones.

vLLM refuses a request at three stages, each with its own answer, and the simulator keeps them apart:
- the request model (pydantic: types, the model's `before` validators, `seed`'s range): 400 with type
  "Bad Request" and FastAPI's list of validation errors as the message (`Refusal.invalid`);
- the serving code (unknown model 404, prompt too long, the sampling parameters' own checks): 400 with type
  "BadRequestError" (`Refusal.bad_request`);
- the engine (more logprobs than `max_logprobs`): the same 400 before a non-stream answer, an error event in
  a stream that has started (see `server.py`).
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec

_LONG_MIN: Final = -(2**63)  # torch.long's range, which vLLM checks `seed` against
_LONG_MAX: Final = 2**63 - 1
_PATH: Final = re.compile(r" - at `\$(.*)`$")
_PATH_PART: Final = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
_MISSING: Final = re.compile(r"^Object missing required field `([^`]+)`")
_T = TypeVar("_T")
COMPLETION_MAX_TOKENS: Final = 16  # what a legacy completion generates at most when it names no max_tokens
MAX_N_SEQUENCES: Final = int(os.environ.get("VLLM_MAX_N_SEQUENCES", "16384"))
"""vLLM's bound on `n` (its environment variable, read the same way): a client cannot ask for a billion outputs."""


class Refusal(Exception):
    """A request vLLM would refuse: its status, error type and message."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message

    @classmethod
    def bad_request(cls, message: str) -> Refusal:
        return cls(400, "BadRequestError", message)

    @classmethod
    def invalid(cls, *errors: dict[str, Any]) -> Refusal:
        """FastAPI's RequestValidationError as vLLM answers it: the errors' Python repr is the message."""
        return cls(400, "Bad Request", str(list(errors)))


def _value_error(message: str, data: object) -> Refusal:
    """A `before` model validator's ValueError, as pydantic reports it."""
    error = {"type": "value_error", "loc": ("body",), "msg": f"Value error, {message}", "input": data}
    return Refusal.invalid({**error, "ctx": {"error": ValueError(message)}})


class TextPart(msgspec.Struct):
    text: str | None = None  # image and audio parts carry no text and count for nothing


class Message(msgspec.Struct):
    """vLLM takes any role and ignores fields it does not know, in messages as in the body."""

    role: str
    content: str | list[TextPart] | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = True  # vLLM's default: `stream_options: {}` asks for the usage chunk
    continuous_usage_stats: bool | None = False


class ResponseFormat(msgspec.Struct):
    # json_schema's schema is not followed: the answer is always {"text": ...}, a JSON object all the same.
    type: Literal["text", "json_object", "json_schema", "structural_tag"]


class Function(msgspec.Struct):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(msgspec.Struct):
    function: Function
    type: Literal["function"] = "function"


class StructuredOutputs(msgspec.Struct):
    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


Prompt = str | list[Any]  # vLLM's str | list[str] | list[int] | list[list[int]], checked by `prompts`


class TokenizeRequest(msgspec.Struct):
    model: str | None = None
    prompt: Prompt | None = None
    messages: list[Message] | None = None


class Sampling(msgspec.Struct):
    """The fields both endpoints share; None is "not given" (vLLM's default applies)."""

    model: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    truncate_prompt_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None  # vLLM's: the prompt's last k tokens
    response_format: ResponseFormat | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None

    @property
    def json_object(self) -> bool:
        return self.response_format is not None and self.response_format.type != "text"

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or ())

    @property
    def usage_chunk(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.usage_chunk and bool(self.stream_options and self.stream_options.continuous_usage_stats)


class ChatRequest(Sampling, kw_only=True):
    messages: list[Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = 0
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = "none"
    echo: bool = False

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens  # vLLM's `or`: a 0 of either falls to the other

    @property
    def sample_logprobs(self) -> int | None:
        """How many top logprobs each token carries, or None for no logprobs (vLLM's SamplingParams.logprobs)."""
        return self.top_logprobs if self.logprobs else None


class CompletionRequest(Sampling, kw_only=True):
    prompt: Prompt | None = None
    max_tokens: int | msgspec.UnsetType | None = msgspec.UNSET  # not given: 16, OpenAI's and vLLM's default
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None

    @property
    def requested_tokens(self) -> int | None:
        return COMPLETION_MAX_TOKENS if self.max_tokens is msgspec.UNSET else self.max_tokens

    @property
    def sample_logprobs(self) -> int | None:
        return self.logprobs


def _loc(message: str) -> tuple[str, tuple[str | int, ...]]:
    found = _PATH.search(message)
    if found is None:
        return message, ("body",)
    parts = [name if name else int(index) for name, index in _PATH_PART.findall(found.group(1))]
    return message[: found.start()], ("body", *parts)


def _typed(data: dict[str, Any], type_: type[_T]) -> _T:
    try:
        return msgspec.convert(data, type_, strict=False)  # lax, as pydantic is: "3" is 3
    except msgspec.ValidationError as e:
        message, loc = _loc(str(e))
        if missing := _MISSING.match(message):
            raise Refusal.invalid(
                {"type": "missing", "loc": (*loc, missing.group(1)), "msg": "Field required", "input": data}
            ) from e
        raise Refusal.invalid({"type": "invalid", "loc": loc, "msg": message}) from e


def _document(body: bytes) -> dict[str, Any]:
    try:
        data = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
        raise Refusal.invalid(
            {"type": "json_invalid", "loc": ("body", 0), "msg": "JSON decode error", "ctx": {"error": str(e)}}
        ) from e
    if not isinstance(data, dict):
        raise Refusal.invalid(
            {"type": "model_attributes_type", "loc": ("body",), "msg": "Input should be a valid dictionary or object"}
        )
    return data


def _check_stream_options(data: dict[str, Any]) -> None:
    if data.get("stream_options") and not data.get("stream"):
        raise _value_error("Stream options can only be defined when `stream=True`.", data)


def _check_guides(data: dict[str, Any]) -> None:
    if sum(data.get(name) is not None for name in ("guided_json", "guided_regex", "guided_choice")) > 1:
        raise _value_error(
            "You can only use one kind of guided decoding ('guided_json', 'guided_regex' or 'guided_choice').", data
        )


def _negative(value: object) -> bool:
    return isinstance(value, int | float) and value < 0


def _check_chat_logprobs(data: dict[str, Any]) -> None:
    top = data.get("top_logprobs")
    if _negative(top):
        raise _value_error("`top_logprobs` must be a positive value.", data)
    if isinstance(top, int | float) and top > 0 and not data.get("logprobs"):
        raise _value_error("when using `top_logprobs`, `logprobs` must be set to true.", data)


_CORRECT_USAGE: Final = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'


def _check_tools(data: dict[str, Any]) -> None:
    if "tool_choice" not in data and data.get("tools"):
        data["tool_choice"] = "auto"  # vLLM's default once tools are given
    choice = data.get("tool_choice")
    if choice is None or choice == "none":
        return
    if data.get("tools") is None:
        raise _value_error("When using `tool_choice`, `tools` must be set.", data)
    if choice not in ("auto", "required") and not isinstance(choice, dict):
        raise _value_error(
            f'Invalid value for `tool_choice`: {choice}! Only named tools, "none", "auto" or "required" are supported.',
            data,
        )
    if not isinstance(choice, dict):
        return
    function = choice.get("function")
    if not isinstance(function, dict):
        raise _value_error(f"Invalid value for `function`: `{function}` in `tool_choice`! {_CORRECT_USAGE}", data)
    if "name" not in function:
        raise _value_error(f"Expected field `name` in `function` in `tool_choice`! {_CORRECT_USAGE}", data)
    name = function["name"]
    if not isinstance(name, str) or not name:
        raise _value_error(f"Invalid `name` in `function`: `{name}` in `tool_choice`! {_CORRECT_USAGE}", data)
    tools = data["tools"] if isinstance(data["tools"], list) else []
    if not any(isinstance(t, dict) and (t.get("function") or {}).get("name") == name for t in tools):
        raise _value_error("The tool specified in `tool_choice` does not match any of the specified `tools`", data)


def _check_seed(data: dict[str, Any]) -> None:
    seed = data.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        return
    for bad, kind, word, bound in (
        (seed > _LONG_MAX, "less_than_equal", "less", _LONG_MAX),
        (seed < _LONG_MIN, "greater_than_equal", "greater", _LONG_MIN),
    ):
        if bad:
            constraint = "le" if word == "less" else "ge"
            raise Refusal.invalid(
                {
                    "type": kind,
                    "loc": ("body", "seed"),
                    "msg": f"Input should be {word} than or equal to {bound}",
                    "input": seed,
                    "ctx": {constraint: bound},
                }
            )


def chat_request(body: bytes) -> ChatRequest:
    data = _document(body)
    _check_stream_options(data)
    _check_chat_logprobs(data)
    _check_guides(data)
    _check_tools(data)
    if data.get("continue_final_message") and data.get("add_generation_prompt"):
        raise _value_error("Cannot set both `continue_final_message` and `add_generation_prompt` to True.", data)
    _check_seed(data)
    return _typed(data, ChatRequest)


def completion_request(body: bytes) -> CompletionRequest:
    data = _document(body)
    _check_guides(data)
    if _negative(data.get("logprobs")):
        raise _value_error("`logprobs` must be a positive value.", data)
    _check_stream_options(data)
    if data.get("prompt") is None and data.get("prompt_embeds") is None:
        raise _value_error("At least one of `prompt` or `prompt_embeds` must be set.", data)
    _check_seed(data)
    request = _typed(data, CompletionRequest)
    prompts(request.prompt)  # refuses a mixed list here, with the other type errors
    return request


def prompts(prompt: Prompt | None) -> list[str | list[int]]:
    """The prompts of a completion: a string, or each string of a list, or a list of token ids, or each of those."""
    if isinstance(prompt, str):
        return [prompt]
    items = prompt or []
    if all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        return [list(items)]
    if all(isinstance(i, str) for i in items):
        return list(items)
    if all(isinstance(i, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in i) for i in items):
        return list(items)
    raise Refusal.invalid(
        {
            "type": "union_tag_invalid",
            "loc": ("body", "prompt"),
            "msg": "Input should be a string, a list of strings, of token ids, or of lists of token ids",
            "input": prompt,
        }
    )


def tokenize_request(body: bytes) -> TokenizeRequest:
    return _typed(_document(body), TokenizeRequest)


def _n_problem(n: int) -> str | None:
    if n < 1:
        return f"n must be at least 1, got {n}."
    if n > MAX_N_SEQUENCES:
        return (
            f"n must be at most {MAX_N_SEQUENCES}, got {n}. "
            "To increase this limit, set the VLLM_MAX_N_SEQUENCES environment variable."
        )
    return None


def sampling_problem(req: ChatRequest | CompletionRequest, max_tokens: int) -> str | None:  # noqa: PLR0911
    """vLLM's SamplingParams checks, in its order; None applies the default, as SamplingParams.from_optional does."""
    n = 1 if req.n is None else req.n
    presence = 0.0 if req.presence_penalty is None else req.presence_penalty
    frequency = 0.0 if req.frequency_penalty is None else req.frequency_penalty
    repetition = 1.0 if req.repetition_penalty is None else req.repetition_penalty
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    top_k = 0 if req.top_k is None else req.top_k
    min_p = 0.0 if req.min_p is None else req.min_p
    if (problem := _n_problem(n)) is not None:
        return problem
    if not -2.0 <= presence <= 2.0:
        return f"presence_penalty must be in [-2, 2], got {presence}."
    if not -2.0 <= frequency <= 2.0:
        return f"frequency_penalty must be in [-2, 2], got {frequency}."
    if repetition <= 0.0:
        return f"repetition_penalty must be greater than zero, got {repetition}."
    if temperature < 0.0:
        return f"temperature must be non-negative, got {temperature}."
    if not 0.0 < top_p <= 1.0:
        return f"top_p must be in (0, 1], got {top_p}."
    if top_k < -1:
        return f"top_k must be 0 (disable), or at least 1, got {top_k}."
    if not 0.0 <= min_p <= 1.0:
        return f"min_p must be in [0, 1], got {min_p}."
    if max_tokens < 1:
        return f"max_tokens must be at least 1, got {max_tokens}."
    if req.min_tokens < 0:
        return f"min_tokens must be greater than or equal to 0, got {req.min_tokens}."
    if req.min_tokens > max_tokens:
        return f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {req.min_tokens}."
    if any(not stop for stop in req.stops):
        return "stop cannot contain an empty string."
    return None
