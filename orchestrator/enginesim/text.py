"""The engine simulator's tokens: the request bodies it reads, how prompts count, and the answers it generates."""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Final, Literal

import msgspec

WORDS: Final = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog")
_TEMPLATE_TOKENS: Final = 3  # chat template tokens around each message, and once more for the assistant turn
_TEMPLATE_IDS: Final = (1, 2, 3)
_VOCAB: Final = 32_000
# A JSON-mode answer of n tokens: _JSON_OPEN, n - 2 words, _JSON_CLOSE; one token is too few to open
# and close a key, so it is _JSON_EMPTY. Either way the tokens concatenate to a JSON object, however small
# max_tokens is; finish_reason stays "length", as for every simulated answer.
_JSON_OPEN: Final = '{"text": "'
_JSON_CLOSE: Final = '"}'
_JSON_EMPTY: Final = "{}"


class TextPart(msgspec.Struct):
    text: str | None = None  # image and audio parts carry no text and count for nothing


class Message(msgspec.Struct):
    content: str | list[TextPart] | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class ResponseFormat(msgspec.Struct):
    # json_schema's schema is not followed: the answer is always {"text": ...}, a JSON object all the same.
    type: Literal["text", "json_object", "json_schema"]


Prompt = str | list[str | int | list[int]]


class Sampling(msgspec.Struct):
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    truncate_prompt_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None  # vLLM's: the prompt's last k tokens
    response_format: ResponseFormat | None = None

    @property
    def json_object(self) -> bool:
        return self.response_format is not None and self.response_format.type != "text"


class ChatRequest(Sampling, kw_only=True):
    messages: list[Message]


class CompletionRequest(Sampling, kw_only=True):
    prompt: Prompt


class TokenizeRequest(msgspec.Struct):
    model: str | None = None
    prompt: Prompt | None = None
    messages: list[Message] | None = None


def _content_words(content: str | list[TextPart] | None) -> list[str]:
    if isinstance(content, str):
        return content.split()
    if content is None:
        return []
    return [word for part in content if part.text for word in part.text.split()]


def chat_tokens(request: ChatRequest) -> int:
    return sum(len(_content_words(m.content)) + _TEMPLATE_TOKENS for m in request.messages) + _TEMPLATE_TOKENS


def prompt_tokens(request: CompletionRequest) -> int:
    prompt = request.prompt
    if isinstance(prompt, str):
        return len(prompt.split())
    return sum(
        len(item.split()) if isinstance(item, str) else 1 if isinstance(item, int) else len(item) for item in prompt
    )


def _word_id(word: str) -> int:
    return zlib.crc32(word.encode()) % _VOCAB


def chat_ids(messages: list[Message]) -> list[int]:
    ids: list[int] = []
    for message in messages:
        ids += _TEMPLATE_IDS
        ids += (_word_id(word) for word in _content_words(message.content))
    return ids + list(_TEMPLATE_IDS)


def prompt_ids(prompt: Prompt) -> list[int]:
    ids: list[int] = []
    for item in [prompt] if isinstance(prompt, str) else prompt:
        if isinstance(item, str):
            ids += (_word_id(word) for word in item.split())
        elif isinstance(item, int):
            ids.append(item)
        else:
            ids += item
    return ids


@dataclass(frozen=True)
class AnswerShape:
    """The pre-encoded JSON pieces of one endpoint's answers; a request only adds its id, numbers and text."""

    id_prefix: bytes
    object_: bytes
    chunk_object: bytes
    answer: tuple[bytes, bytes]  # around the JSON text of the non-stream choice
    delta: tuple[bytes, bytes, bytes]  # before a stream token's JSON text, after it, and after the last one
    token: tuple[bytes, ...]  # stream choice per word of WORDS, finish_reason null
    last: tuple[bytes, ...]  # the same with finish_reason "length"
    prelude: bytes  # choice of the chunk sent before the first token; empty for none


_NULL: Final = b',"logprobs":null,"finish_reason":null}'
_LENGTH: Final = b',"logprobs":null,"finish_reason":"length"}'


def _kind(
    *, id_prefix: bytes, object_: bytes, chunk_object: bytes, answer: bytes, delta: bytes, close: bytes, prelude: bytes
) -> AnswerShape:
    """`answer` and `delta` open the choice up to its text; `close` ends what they opened around the text."""
    after, after_last = close + _NULL, close + _LENGTH
    return AnswerShape(
        id_prefix=id_prefix,
        object_=object_,
        chunk_object=chunk_object,
        answer=(answer, after_last),
        delta=(delta, after, after_last),
        token=tuple(delta + msgspec.json.encode(" " + word) + after for word in WORDS),
        last=tuple(delta + msgspec.json.encode(" " + word) + after_last for word in WORDS),
        prelude=prelude,
    )


CHAT: Final = _kind(
    id_prefix=b"chatcmpl-",
    object_=b"chat.completion",
    chunk_object=b"chat.completion.chunk",
    answer=b'{"index":0,"message":{"role":"assistant","content":',
    delta=b'{"index":0,"delta":{"content":',
    close=b"}",
    prelude=b'{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}',
)
TEXT: Final = _kind(
    id_prefix=b"cmpl-",
    object_=b"text_completion",
    chunk_object=b"text_completion",
    answer=b'{"index":0,"text":',
    delta=b'{"index":0,"text":',
    close=b"",
    prelude=b"",
)


def _json_tokens(completion: int) -> list[str]:
    if completion == 1:
        return [_JSON_EMPTY]
    words = [" " + WORDS[i % len(WORDS)] for i in range(completion - 2)]
    if words:
        words[0] = words[0].lstrip()
    return [_JSON_OPEN, *words, _JSON_CLOSE]


def choices(kind: AnswerShape, completion: int, json_object: bool) -> Iterable[bytes]:
    """The stream choice of each of the completion's tokens, the last one finishing with "length"."""
    if json_object:
        before, after, after_last = kind.delta
        *tokens, last = (msgspec.json.encode(token) for token in _json_tokens(completion))
        return [*(before + token + after for token in tokens), before + last + after_last]
    last = kind.last[(completion - 1) % len(WORDS)]
    return itertools.chain(itertools.islice(itertools.cycle(kind.token), completion - 1), (last,))


class Texts:
    """The non-stream answer text of each length, JSON-encoded once: the concatenation of the stream's tokens."""

    def __init__(self) -> None:
        self.plain: dict[int, bytes] = {}
        self.json: dict[int, bytes] = {}

    def get(self, completion: int, json_object: bool) -> bytes:
        cache = self.json if json_object else self.plain
        text = cache.get(completion)
        if text is None:
            words = (" " + WORDS[i % len(WORDS)] for i in range(completion))
            tokens = _json_tokens(completion) if json_object else words
            text = cache[completion] = msgspec.json.encode("".join(tokens))
        return text
