"""The engine simulator answers as vLLM's OpenAI server does: logprobs, n, stop, usage, and vLLM's 400s, over HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.support.engines import engine_in_process, post_json

MODEL = "sim-model"
MESSAGES = [{"role": "user", "content": "one two three"}]
CHAT_PROMPT_TOKENS = 3 + 3 + 3


@pytest.fixture
async def base() -> AsyncIterator[str]:
    async with engine_in_process(MODEL) as engine:
        yield engine.url


async def chat(http: aiohttp.ClientSession, base: str, **extra: Any) -> tuple[int, Any]:
    return await post_json(http, f"{base}/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, **extra})


async def complete(http: aiohttp.ClientSession, base: str, **extra: Any) -> tuple[int, Any]:
    return await post_json(http, f"{base}/v1/completions", {"model": MODEL, "prompt": "one two", **extra})


async def chunks(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    async with http.post(url, json={**body, "stream": True}) as r:
        assert r.status == 200
        text = await r.text()
    assert text.endswith("\n\ndata: [DONE]\n\n")
    return [json.loads(block.removeprefix("data: ")) for block in text.split("\n\n")[:-2]]


def without_ids(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in ("id", "created")}


# --- logprobs ---


async def test_chat_logprobs_shape(base: str, http: aiohttp.ClientSession) -> None:
    status, body = await chat(http, base, max_tokens=3, logprobs=True, top_logprobs=4)
    assert status == 200
    [choice] = body["choices"]
    content = choice["logprobs"]["content"]
    assert "".join(entry["token"] for entry in content) == choice["message"]["content"]
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 4
        assert entry["top_logprobs"][0] == {k: entry[k] for k in ("token", "logprob", "bytes")}  # sampled = likeliest
        logprobs = [top["logprob"] for top in entry["top_logprobs"]]
        assert logprobs == sorted(logprobs, reverse=True)
        assert all(-9999.0 <= lp <= 0 for lp in logprobs)
    _, zero = await chat(http, base, max_tokens=3, logprobs=True, top_logprobs=0)
    assert [e["top_logprobs"] for e in zero["choices"][0]["logprobs"]["content"]] == [[], [], []]
    _, none = await chat(http, base, max_tokens=3, logprobs=False)
    assert none["choices"][0]["logprobs"] is None


async def test_chat_stream_logprobs_match_the_whole_answer(base: str, http: aiohttp.ClientSession) -> None:
    request = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "logprobs": True, "top_logprobs": 2}
    _, whole = await post_json(http, f"{base}/v1/chat/completions", request)
    stream = await chunks(http, f"{base}/v1/chat/completions", request)
    assert stream[0]["choices"][0]["logprobs"] is None  # the role chunk
    entries = [e for c in stream[1:] for e in c["choices"][0]["logprobs"]["content"]]
    assert entries == whole["choices"][0]["logprobs"]["content"]


async def test_completion_logprobs_shape(base: str, http: aiohttp.ClientSession) -> None:
    status, body = await complete(http, base, max_tokens=3, logprobs=2)
    assert status == 200
    [choice] = body["choices"]
    logprobs = choice["logprobs"]
    assert set(logprobs) == {"text_offset", "token_logprobs", "tokens", "top_logprobs"}
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert logprobs["text_offset"] == [0, len(logprobs["tokens"][0]), len("".join(logprobs["tokens"][:2]))]
    assert all(len(top) == 2 for top in logprobs["top_logprobs"])
    for token, lp, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True):
        assert top[token] == lp
    _, zero = await complete(http, base, max_tokens=2, logprobs=0)  # the sampled token alone
    assert [len(top) for top in zero["choices"][0]["logprobs"]["top_logprobs"]] == [1, 1]
    stream = await chunks(http, f"{base}/v1/completions", {"prompt": "x", "max_tokens": 3, "logprobs": 2})
    streamed = [c["choices"][0]["logprobs"] for c in stream]
    assert [lp["tokens"][0] for lp in streamed] == logprobs["tokens"]
    assert [lp["text_offset"][0] for lp in streamed] == logprobs["text_offset"]


async def test_too_many_logprobs(base: str, http: aiohttp.ClientSession) -> None:
    message = "Requested sample logprobs of 21, which is greater than max allowed: 20"
    bad = {"message": message, "type": "BadRequestError", "param": None, "code": 400}
    assert await chat(http, base, logprobs=True, top_logprobs=21) == (400, {"error": bad})
    assert await complete(http, base, logprobs=21) == (400, {"error": bad})
    # A stream has started when vLLM's engine refuses it: an error event, then [DONE].
    stream = await chunks(
        http, f"{base}/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}
    )
    assert stream == [{"error": bad}]
    assert (await chat(http, base, logprobs=True, top_logprobs=20))[0] == 200
    async with engine_in_process(MODEL, max_logprobs=-1) as unlimited:
        assert (await chat(http, unlimited.url, logprobs=True, top_logprobs=50))[0] == 200


# --- n, stop, finish reasons, lengths ---


async def test_n_choices(base: str, http: aiohttp.ClientSession) -> None:
    _, body = await chat(http, base, max_tokens=3, n=3)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert len({c["message"]["content"] for c in body["choices"]}) == 3  # sampled differently
    assert body["usage"]["completion_tokens"] == 9
    _, single = await chat(http, base, max_tokens=3)
    assert single["choices"][0]["message"] == body["choices"][0]["message"]
    stream = await chunks(http, f"{base}/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 3, "n": 3})
    texts: dict[int, str] = {}
    for chunk in stream:
        [choice] = chunk["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + (choice["delta"].get("content") or "")
    assert texts == {c["index"]: c["message"]["content"] for c in body["choices"]}
    _, text = await complete(http, base, prompt=["a", "b"], max_tokens=2, n=2)
    assert [c["index"] for c in text["choices"]] == [0, 1, 2, 3]
    assert text["usage"] == {"prompt_tokens": 2, "completion_tokens": 8, "total_tokens": 10}


async def test_stop_strings(base: str, http: aiohttp.ClientSession) -> None:
    # The words go " the quick brown fox jumps ...".
    _, body = await chat(http, base, max_tokens=8, stop=["fox", "zzz"])
    [choice] = body["choices"]
    assert choice["message"]["content"] == " the quick brown "
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", "fox")
    assert body["usage"]["completion_tokens"] == 4  # the token that completed the stop string counts
    _, kept = await complete(http, base, max_tokens=8, stop="brown", include_stop_str_in_output=True)
    assert kept["choices"][0]["text"] == " the quick brown"
    stream = await chunks(http, f"{base}/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 8, "stop": "fox"})
    assert "".join(c["choices"][0]["delta"]["content"] for c in stream) == " the quick brown "
    assert stream[-1]["choices"][0]["finish_reason"] == "stop"
    assert stream[-1]["choices"][0]["stop_reason"] == "fox"
    _, missed = await chat(http, base, max_tokens=3, stop="dog")
    assert (missed["choices"][0]["finish_reason"], missed["choices"][0]["stop_reason"]) == ("length", None)


async def test_lengths_and_finish_reasons(http: aiohttp.ClientSession) -> None:
    async with engine_in_process(MODEL, max_tokens=5, max_model_len=64) as engine:
        # No length named: the model stops by itself after --max-tokens tokens.
        _, body = await chat(http, engine.url)
        assert (body["usage"]["completion_tokens"], body["choices"][0]["finish_reason"]) == (5, "stop")
        _, body = await chat(http, engine.url, max_completion_tokens=7)
        assert (body["usage"]["completion_tokens"], body["choices"][0]["finish_reason"]) == (7, "length")
        _, body = await chat(http, engine.url, max_completion_tokens=0, max_tokens=2)  # vLLM's `or`
        assert body["usage"]["completion_tokens"] == 2
        _, body = await chat(http, engine.url, ignore_eos=True)  # to the end of the context
        assert body["usage"]["completion_tokens"] == 64 - CHAT_PROMPT_TOKENS
    async with engine_in_process(MODEL, max_tokens=100) as engine:
        _, body = await complete(http, engine.url)  # the legacy completions' default: 16
        assert (body["usage"]["completion_tokens"], body["choices"][0]["finish_reason"]) == (16, "length")
        _, body = await complete(http, engine.url, max_tokens=None)  # null: no default, the model stops itself
        assert (body["usage"]["completion_tokens"], body["choices"][0]["finish_reason"]) == (100, "stop")


async def test_echo(base: str, http: aiohttp.ClientSession) -> None:
    _, body = await complete(http, base, max_tokens=2, echo=True)
    assert body["choices"][0]["text"] == "one two the quick"
    stream = await chunks(http, f"{base}/v1/completions", {"prompt": "one two", "max_tokens": 2, "echo": True})
    assert "".join(c["choices"][0]["text"] for c in stream) == "one two the quick"


# --- usage in streams ---


async def test_stream_usage_rules(base: str, http: aiohttp.ClientSession) -> None:
    url = f"{base}/v1/chat/completions"
    request = {"messages": MESSAGES, "max_tokens": 3}
    assert all("usage" not in c for c in await chunks(http, url, request))
    off = await chunks(http, url, {**request, "stream_options": {"include_usage": False}})
    assert all("usage" not in c for c in off)
    default = await chunks(http, url, {**request, "stream_options": {}})  # vLLM's include_usage defaults to true
    assert default[-1]["choices"] == []
    assert default[-1]["usage"] == {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    options = {"include_usage": True, "continuous_usage_stats": True}
    continuous = await chunks(http, url, {**request, "n": 2, "stream_options": options})
    assert [c["usage"]["completion_tokens"] for c in continuous] == [0, 0, 1, 1, 2, 2, 3, 3, 6]
    assert all(c["usage"]["total_tokens"] == 9 + c["usage"]["completion_tokens"] for c in continuous)


async def test_the_general_path_answers_like_the_plain_one(base: str, http: aiohttp.ClientSession) -> None:
    """A stop string that never shows up takes the general path: its answers are the plain path's."""
    for path, request in (
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 4}),
        ("/v1/completions", {"prompt": "one two", "max_tokens": 4}),
    ):
        url = f"{base}{path}"
        _, plain = await post_json(http, url, request)
        _, general = await post_json(http, url, {**request, "stop": "zzz"})
        assert without_ids(plain) == without_ids(general)
        with_usage = {**request, "stream_options": {"include_usage": True}}
        plain_stream = [without_ids(c) for c in await chunks(http, url, with_usage)]
        general_stream = [without_ids(c) for c in await chunks(http, url, {**with_usage, "stop": ["zzz"]})]
        assert plain_stream == general_stream


# --- vLLM's refusals ---


def _chat(**extra: Any) -> tuple[str, dict[str, Any]]:
    return "/v1/chat/completions", {"messages": MESSAGES, **extra}


def _text(**extra: Any) -> tuple[str, dict[str, Any]]:
    return "/v1/completions", {"prompt": "one two", **extra}


INVALID = [  # the request model's (pydantic's) errors: "Bad Request", the message names what was wrong
    (*_chat(stream_options={"include_usage": True}), "Stream options can only be defined when `stream=True`."),
    (*_text(stream_options={"include_usage": None}), "Stream options can only be defined when `stream=True`."),
    (*_chat(seed=2**63), "less_than_equal"),
    (*_chat(seed=-(2**63) - 1), "greater_than_equal"),
    (
        *_chat(tool_choice={"type": "function", "function": {"name": "f"}}),
        "When using `tool_choice`, `tools` must be set.",
    ),
    (*_chat(top_logprobs=2), "when using `top_logprobs`, `logprobs` must be set to true."),
    (*_chat(logprobs=True, top_logprobs=-1), "`top_logprobs` must be a positive value."),
    (*_text(logprobs=-1), "`logprobs` must be a positive value."),
    (*_chat(guided_regex=123), "guided_regex"),
    (*_chat(guided_choice="abc"), "guided_choice"),
    (*_chat(guided_regex="a", guided_choice=["a"]), "You can only use one kind of guided decoding"),
    ("/v1/completions", {"max_tokens": 3}, "At least one of `prompt` or `prompt_embeds` must be set."),
    ("/v1/chat/completions", {"max_tokens": 3}, "Field required"),
]
BAD = [  # the serving code's: "BadRequestError", vLLM's exact words
    (*_chat(n=0), "n must be at least 1, got 0."),
    (*_text(n=0), "n must be at least 1, got 0."),
    (  # n: 10**9 used to take the simulator's memory (5.6 GB and growing) instead
        *_text(n=16385),
        "n must be at most 16384, got 16385. To increase this limit, set the VLLM_MAX_N_SEQUENCES environment "
        "variable.",
    ),
    (*_chat(temperature=-1), "temperature must be non-negative, got -1.0."),
    (*_chat(top_p=0), "top_p must be in (0, 1], got 0.0."),
    (*_text(top_p=1.5), "top_p must be in (0, 1], got 1.5."),
    (*_chat(presence_penalty=3), "presence_penalty must be in [-2, 2], got 3.0."),
    (*_chat(max_tokens=0), "max_tokens must be at least 1, got 0."),
    (*_text(max_tokens=-1), "max_tokens must be at least 1, got -1."),
    (*_chat(stop=["a", ""]), "stop cannot contain an empty string."),
    (
        *_chat(tools=[{"type": "function", "function": {"name": "f"}}]),
        '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
    ),
    (
        *_chat(max_tokens=5000),
        "This model's maximum context length is 4096 tokens. However, you requested 5009 tokens (9 in the messages, "
        "5000 in the completion). Please reduce the length of the messages or completion. None",
    ),
    (
        *_text(max_tokens=5000),
        "This model's maximum context length is 4096 tokens. However, you requested 5002 tokens (2 in the messages, "
        "5000 in the completion). Please reduce the length of the messages or completion.",
    ),
]


@pytest.mark.parametrize(("path", "body", "words"), INVALID)
async def test_the_request_models_refusals(
    base: str, http: aiohttp.ClientSession, path: str, body: dict[str, Any], words: str
) -> None:
    status, answer = await post_json(http, f"{base}{path}", body)
    assert status == 400
    error = answer["error"]
    assert words in error.pop("message")
    assert error == {"type": "Bad Request", "param": None, "code": 400}


@pytest.mark.parametrize(("path", "body", "message"), BAD)
async def test_the_serving_codes_refusals(
    base: str, http: aiohttp.ClientSession, path: str, body: dict[str, Any], message: str
) -> None:
    status, answer = await post_json(http, f"{base}{path}", body)
    assert (status, answer) == (
        400,
        {"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}},
    )


@pytest.mark.parametrize(
    "extra",
    [
        {"messages": [{"role": "user", "content": "hi", "extra_field": "0"}]},  # vLLM ignores unknown fields
        {"messages": [{"role": "my-custom-role", "content": "hi"}]},
        {"seed": 2**63 - 1, "temperature": 3, "top_p": 1, "top_k": -1},
        {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"},
        {
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
        },
        {"top_logprobs": 0},
        {"stream_options": {}},  # empty: falsy, as vLLM's validator reads it
        {"max_tokens": "3"},  # pydantic's lax mode reads it as 3
    ],
)
async def test_what_vllm_accepts(base: str, http: aiohttp.ClientSession, extra: dict[str, Any]) -> None:
    status, body = await post_json(http, f"{base}/v1/chat/completions", {"messages": MESSAGES, **extra})
    assert status == 200, body
