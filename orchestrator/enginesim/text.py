"""The engine simulator's tokens: how prompts count, and the pre-encoded pieces of its plain answers."""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import msgspec

from orchestrator.enginesim.bodies import ChatRequest, CompletionRequest, Message, Prompt, TextPart, prompts

WORDS: Final = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog")
_TEMPLATE_TOKENS: Final = 3  # chat template tokens around each message, and once more for the assistant turn
_TEMPLATE_IDS: Final = (1, 2, 3)
_VOCAB: Final = 32_000
# A JSON-mode answer of n tokens: _JSON_OPEN, n - 2 words, _JSON_CLOSE; one token is too few to open
# and close a key, so it is _JSON_EMPTY. Either way the tokens concatenate to a JSON object, however small
# max_tokens is.
_JSON_OPEN: Final = '{"text": "'
_JSON_CLOSE: Final = '"}'
_JSON_EMPTY: Final = "{}"


def _content_words(content: str | list[TextPart] | None) -> list[str]:
    if isinstance(content, str):
        return content.split()
    if content is None:
        return []
    return [word for part in content if part.text for word in part.text.split()]


def chat_tokens(request: ChatRequest) -> int:
    return sum(len(_content_words(m.content)) + _TEMPLATE_TOKENS for m in request.messages) + _TEMPLATE_TOKENS


def prompt_tokens(request: CompletionRequest) -> int:
    return sum(len(ids) for ids in completion_prompt_ids(request.prompt))


def _word_id(word: str) -> int:
    return zlib.crc32(word.encode()) % _VOCAB


def chat_ids(messages: list[Message]) -> list[int]:
    ids: list[int] = []
    for message in messages:
        ids += _TEMPLATE_IDS
        ids += (_word_id(word) for word in _content_words(message.content))
    return ids + list(_TEMPLATE_IDS)


def completion_prompt_ids(prompt: Prompt | None) -> list[list[int]]:
    """The token ids of each prompt of a completion (a word a token; ids as given)."""
    return [[_word_id(w) for w in p.split()] if isinstance(p, str) else p for p in prompts(prompt)]


def prompt_ids(prompt: Prompt) -> list[int]:
    """The token ids of /tokenize's prompt: every piece of it, one after the other."""
    ids: list[int] = []
    for item in [prompt] if isinstance(prompt, str) else prompt:
        if isinstance(item, str):
            ids += (_word_id(word) for word in item.split())
        elif isinstance(item, int):
            ids.append(item)
        elif isinstance(item, list):
            ids += (i for i in item if isinstance(i, int))
    return ids


@dataclass(frozen=True)
class AnswerShape:
    """The pre-encoded JSON pieces of one endpoint's answers; a request only adds its id, numbers and text."""

    id_prefix: bytes
    object_: bytes
    chunk_object: bytes
    answer: tuple[bytes, bytes]  # around the JSON text of the non-stream choice, up to its finish reason
    delta: tuple[bytes, bytes, bytes]  # before a stream token's JSON text, after it, and after the last one's
    token: tuple[bytes, ...]  # stream choice per word of WORDS, finish_reason null
    prelude: bytes  # choice of the chunk sent before the first token; empty for none


_NULL: Final = b',"logprobs":null,"finish_reason":null}'
_FINISHED: Final = b',"logprobs":null,"finish_reason":'  # then the reason and `_STOP_REASON`
_STOP_REASON: Final = b',"stop_reason":null}'


def finished(shape: bytes, reason: str) -> bytes:
    """`shape` (an AnswerShape's piece that ends a last choice) closed with the finish reason."""
    return shape + b'"' + reason.encode() + b'"' + _STOP_REASON


def _kind(
    *, id_prefix: bytes, object_: bytes, chunk_object: bytes, answer: bytes, delta: bytes, close: bytes, prelude: bytes
) -> AnswerShape:
    """`answer` and `delta` open the choice up to its text; `close` ends what they opened around the text."""
    return AnswerShape(
        id_prefix=id_prefix,
        object_=object_,
        chunk_object=chunk_object,
        answer=(answer, close + _FINISHED),
        delta=(delta, close + _NULL, close + _FINISHED),
        token=tuple(delta + msgspec.json.encode(" " + word) + close + _NULL for word in WORDS),
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


def token_texts(completion: int, json_object: bool, start: int = 0) -> list[str]:
    """The text of each token of an answer; `start` shifts the words (each of n choices starts elsewhere)."""
    if json_object:
        return _json_tokens(completion)
    return [" " + WORDS[(start + i) % len(WORDS)] for i in range(completion)]


def choices(kind: AnswerShape, completion: int, json_object: bool, finish: str) -> Iterable[bytes]:
    """The stream choice of each of the completion's tokens, the last one finishing with `finish`."""
    before, _, after_last = kind.delta
    if json_object:
        *tokens, last = (msgspec.json.encode(token) for token in _json_tokens(completion))
        return [*(before + token + kind.delta[1] for token in tokens), finished(before + last + after_last, finish)]
    last = finished(before + msgspec.json.encode(" " + WORDS[(completion - 1) % len(WORDS)]) + after_last, finish)
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
            text = cache[completion] = msgspec.json.encode("".join(token_texts(completion, json_object)))
        return text
