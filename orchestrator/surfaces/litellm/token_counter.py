"""LiteLLM's `/utils/token_counter`: a count by the model's own replica (vLLM's `/tokenize`) when it has a READY
one, else by OpenAI's rule (`orchestrator.gateway.tokens`).

A replica is asked through the gateway's shared session with the replica's own headers (its engine key, never
the client's). Conversations with image parts are not sent: vLLM would fetch every image to count it. Any
failure of that call (refused, timed out, an error status, an answer without a count) falls back to the rule.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Annotated, Any, Final

import aiohttp
import msgspec
import structlog

from orchestrator.gateway.catalog import Catalog, KeyInfo, Target
from orchestrator.gateway.engine_urls import engine_urls
from orchestrator.gateway.tokens import Message, Messages, Prompt, openai_count
from orchestrator.gateway.upstream import Upstream

log = structlog.get_logger(__name__)

OPENAI_TOKENIZER: Final = "openai_tokenizer"
VLLM_TOKENIZER: Final = "vllm"
TOKENIZE_TIMEOUT_S: Final = 5.0  # for all of one count's calls: the rule answers at once, so do not wait long
MAX_TOKENIZE_ANSWER: Final = 32 * 1024 * 1024  # vLLM lists every token id; more than this is not a sane answer


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
