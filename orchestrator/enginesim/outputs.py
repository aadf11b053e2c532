"""The engine simulator's general answers: n choices, stop strings, logprobs, echo, continuous usage, in vLLM's shapes.

Requests with none of these take the pre-encoded path of `text.py`, whose bytes this module's equal (a test says so).
Logprobs are deterministic stand-ins: the sampled token is always the most likely one, its alternatives the other
words, then made-up tokens, each a nat less likely than the one before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from orchestrator.enginesim.text import WORDS, token_texts

_ENCODE: Final = msgspec.json.Encoder()


@dataclass
class Output:
    """One choice: the text of each generated token (cut at a stop string) and how it ended."""

    index: int
    texts: list[str]  # what each token adds to the answer's text; "" past a stop string
    tokens: list[str]  # each token as sampled, for its logprobs
    finish_reason: str
    stop_reason: str | None = None
    prefix: str = ""  # the echoed prompt, before the first token's text

    @property
    def text(self) -> str:
        return self.prefix + "".join(self.texts)


def generate(
    index: int,
    completion: int,
    *,
    start: int,
    json_object: bool,
    stops: list[str],
    include_stop: bool,
    finish: str,
) -> Output:
    """`completion` tokens, or fewer when a stop string shows up: then the text ends before it (or after it, with
    `include_stop`), the tokens generated so far still count, and the finish reason is "stop"."""
    tokens = token_texts(completion, json_object, start)
    text = ""
    longest = max((len(s) for s in stops), default=0)
    for i, token in enumerate(tokens):
        before = len(text)
        text += token
        window = max(0, before - longest + 1)
        hits = [(found, stop) for stop in stops if (found := text.find(stop, window)) >= 0]
        if hits:
            found, stop = min(hits)
            end = found + len(stop) if include_stop else found
            return Output(index, _cut(tokens[: i + 1], end), tokens[: i + 1], "stop", stop)
    return Output(index, tokens, tokens, finish)


def _cut(tokens: list[str], end: int) -> list[str]:
    texts, at = [], 0
    for token in tokens:
        texts.append(token[: max(0, end - at)])
        at += len(token)
    return texts


def _alternatives(token: str, k: int) -> list[str]:
    others = [" " + w for w in WORDS if " " + w != token]
    return (others + [f" w{i}" for i in range(k)])[:k]


def _logprob(position: int) -> float:
    return -round(0.01 * (1 + position % 9), 2)


def _top(token: str, position: int, k: int) -> list[tuple[str, float]]:
    """The k most likely tokens at a position, most likely (the sampled one) first."""
    if k <= 0:
        return []
    return [(token, _logprob(position)), *((alt, -(j + 1.0)) for j, alt in enumerate(_alternatives(token, k - 1)))]


def chat_logprobs(tokens: list[str], first: int, k: int) -> dict[str, Any]:
    """`{"content": [...]}` of vLLM's chat answers; `first` is the position of tokens[0] in the choice."""
    content = []
    for position, token in enumerate(tokens, first):
        top = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in _top(token, position, k)]
        entry = {"token": token, "logprob": _logprob(position), "bytes": list(token.encode()), "top_logprobs": top}
        content.append(entry)
    return {"content": content}


def completion_logprobs(tokens: list[str], first: int, k: int, offset: int) -> dict[str, Any]:
    """The legacy completions' logprobs: the sampled token and its top k (at least itself) at each position."""
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    positions = range(first, first + len(tokens))
    return {
        "text_offset": offsets,
        "token_logprobs": [_logprob(p) for p in positions],
        "tokens": tokens,
        "top_logprobs": [dict(_top(t, p, max(k, 1))) for t, p in zip(tokens, positions, strict=True)],
    }


@dataclass
class Answer:
    """What a request asked for beyond the text, and its outputs."""

    chat: bool
    prompt_tokens: int
    outputs: list[Output]
    logprobs: int | None  # top logprobs per token, or None for none
    usage_chunk: bool = False
    continuous_usage: bool = False
    completion_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.completion_tokens = sum(len(o.tokens) for o in self.outputs)

    def usage(self, completion: int | None = None) -> dict[str, int]:
        done = self.completion_tokens if completion is None else completion
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": done,
            "total_tokens": self.prompt_tokens + done,
        }

    def _logprobs(self, output: Output, first: int, last: int, offset: int) -> dict[str, Any] | None:
        if self.logprobs is None:
            return None
        tokens = output.tokens[first:last]
        if self.chat:
            return chat_logprobs(tokens, first, self.logprobs)
        return completion_logprobs(tokens, first, self.logprobs, offset)

    def body(self, head: bytes) -> bytes:
        """The non-stream answer after `head` (its JSON up to `"choices":[`)."""
        choices = []
        for o in self.outputs:
            choice: dict[str, Any] = {"index": o.index}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": o.text}
            else:
                choice["text"] = o.text
            choice |= {
                "logprobs": self._logprobs(o, 0, len(o.tokens), len(o.prefix)),
                "finish_reason": o.finish_reason,
                "stop_reason": o.stop_reason,
            }
            choices.append(choice)
        return head + _ENCODE.encode(choices)[1:] + b',"usage":' + _ENCODE.encode(self.usage()) + b"}"

    def events(self, head: bytes) -> tuple[list[bytes], int]:
        """The stream's events (without [DONE]) and how many come before the first token's."""
        done = {o.index: 0 for o in self.outputs}
        events = []
        if self.chat:
            for o in self.outputs:
                role = {"index": o.index, "delta": {"role": "assistant", "content": ""}}
                events.append(self._event(head, {**role, "logprobs": None, "finish_reason": None}, 0))
        first = len(events)
        offsets = {o.index: 0 for o in self.outputs}
        for step in range(max(len(o.tokens) for o in self.outputs)):
            for o in self.outputs:
                if step >= len(o.tokens):
                    continue
                text = (o.prefix if step == 0 else "") + o.texts[step]
                choice: dict[str, Any] = {"index": o.index}
                choice |= {"delta": {"content": text}} if self.chat else {"text": text}
                choice["logprobs"] = self._logprobs(o, step, step + 1, offsets[o.index])
                offsets[o.index] += len(text)
                done[o.index] += 1
                last = step == len(o.tokens) - 1
                choice["finish_reason"] = o.finish_reason if last else None
                if last:
                    choice["stop_reason"] = o.stop_reason
                events.append(self._event(head, choice, done[o.index]))
        if self.usage_chunk:
            events.append(b"data: " + head + b'],"usage":' + _ENCODE.encode(self.usage()) + b"}\n\n")
        return events, first

    def _event(self, head: bytes, choice: dict[str, Any], completion: int) -> bytes:
        tail = b"]}\n\n"
        if self.continuous_usage:
            tail = b'],"usage":' + _ENCODE.encode(self.usage(completion)) + b"}\n\n"
        elif self.usage_chunk:
            tail = b'],"usage":null}\n\n'
        return b"data: " + head + _ENCODE.encode(choice) + tail
