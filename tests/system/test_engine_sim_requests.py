"""The engine simulator's truncate_prompt_tokens, JSON response formats and request log, over real HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.support.engines import engine_in_process, post_json

MODEL = "sim-model"
KEY = "sk-sim-log-test-key"
MESSAGES = [{"role": "user", "content": "one two three four five six"}]
CHAT_PROMPT_TOKENS = 6 + 3 + 3  # the words, the message's template tokens, the assistant turn's


@pytest.fixture
async def base() -> AsyncIterator[str]:
    async with engine_in_process(MODEL) as engine:
        yield engine.url


async def chat(http: aiohttp.ClientSession, base: str, **extra: Any) -> tuple[int, Any]:
    return await post_json(http, f"{base}/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, **extra})


async def stream_text(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[list[str], Any]:
    """The token texts of a whole stream, and its usage."""
    async with http.post(url, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status == 200
        text = await r.text()
    assert text.endswith("\n\ndata: [DONE]\n\n")
    chunks = [json.loads(block.removeprefix("data: ")) for block in text.split("\n\n")[:-2]]
    tokens = [
        choice["delta"]["content"] if "delta" in choice else choice["text"]
        for chunk in chunks
        for choice in chunk["choices"]
        if "role" not in choice.get("delta", {})
    ]
    return tokens, chunks[-1]["usage"]


async def requests_log(http: aiohttp.ClientSession, base: str) -> Any:
    async with http.get(f"{base}/sim/requests") as r:
        assert r.status == 200
        return await r.json()


async def metric(http: aiohttp.ClientSession, base: str, name: str) -> float:
    async with http.get(f"{base}/metrics") as r:
        text = await r.text()
    [line] = [line for line in text.splitlines() if line.startswith(name + "{")]
    return float(line.rsplit(" ", 1)[1])


# --- truncate_prompt_tokens ---


async def test_truncation_lowers_the_prompt_count(base: str, http: aiohttp.ClientSession) -> None:
    status, body = await chat(http, base, max_tokens=2, truncate_prompt_tokens=4)
    assert status == 200
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    _, body = await chat(http, base, max_tokens=2, truncate_prompt_tokens=1000)  # a longer limit cuts nothing
    assert body["usage"]["prompt_tokens"] == CHAT_PROMPT_TOKENS
    request = {"prompt": "one two three four five", "max_tokens": 3, "truncate_prompt_tokens": 2}
    status, body = await post_json(http, f"{base}/v1/completions", request)
    assert status == 200
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    tokens, usage = await stream_text(http, f"{base}/v1/completions", request)
    assert len(tokens) == 3
    assert usage == body["usage"]
    assert await metric(http, base, "vllm:prompt_tokens_total") == 4 + CHAT_PROMPT_TOKENS + 2 + 2


async def test_the_context_check_counts_the_truncated_prompt(http: aiohttp.ClientSession) -> None:
    async with engine_in_process(MODEL, max_model_len=16) as engine:
        status, body = await chat(http, engine.url, max_tokens=8)
        assert status == 400
        assert "maximum context length is 16" in body["error"]["message"]
        status, body = await chat(http, engine.url, max_tokens=8, truncate_prompt_tokens=8)
        assert status == 200
        assert body["usage"]["total_tokens"] == 16
        status, body = await chat(http, engine.url, max_tokens=8, truncate_prompt_tokens=17)
        assert status == 400
        assert body["error"] == {
            # A chat's preprocessing errors end with their cause, None here: vLLM's f"{e} {e.__cause__}".
            "message": "truncate_prompt_tokens value (17) is greater than max_model_len (16). "
            "Please, select a smaller truncation size. None",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        }
        assert await metric(http, engine.url, "vllm:prompt_tokens_total") == 8  # refused requests prefilled nothing


@pytest.mark.parametrize("value", [0, -1, "three", 2.5])  # "3" is 3, as pydantic reads it
async def test_truncation_must_be_a_positive_int(base: str, http: aiohttp.ClientSession, value: object) -> None:
    status, body = await chat(http, base, truncate_prompt_tokens=value)
    assert status == 400
    assert "truncate_prompt_tokens" in body["error"]["message"]
    status, _ = await post_json(http, f"{base}/v1/completions", {"prompt": "x", "truncate_prompt_tokens": value})
    assert status == 400


# --- response_format ---


@pytest.mark.parametrize(
    "response_format",
    [{"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "object"}}}],
)
async def test_json_formats_answer_a_json_object(
    base: str, http: aiohttp.ClientSession, response_format: dict[str, Any]
) -> None:
    status, body = await chat(http, base, max_tokens=5, response_format=response_format)
    assert status == 200
    content = body["choices"][0]["message"]["content"]
    assert json.loads(content) == {"text": "the quick brown"}  # the opening, three words, the closing
    assert body["usage"]["completion_tokens"] == 5
    tokens, usage = await stream_text(
        http, f"{base}/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 5, "response_format": response_format}
    )
    assert len(tokens) == usage["completion_tokens"] == 5
    assert "".join(tokens) == content


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 4, 12, 40])
async def test_json_answers_parse_at_every_length(base: str, http: aiohttp.ClientSession, max_tokens: int) -> None:
    request = {"messages": MESSAGES, "max_tokens": max_tokens, "response_format": {"type": "json_object"}}
    status, body = await post_json(http, f"{base}/v1/chat/completions", request)
    assert status == 200
    content = body["choices"][0]["message"]["content"]
    parsed = json.loads(content)
    # One token cannot open and close a key: {}. Past that, {"text": ...} with max_tokens - 2 words.
    if max_tokens == 1:
        assert parsed == {}
    else:
        assert list(parsed) == ["text"]
        assert len(parsed["text"].split()) == max_tokens - 2
    tokens, usage = await stream_text(http, f"{base}/v1/chat/completions", request)
    assert "".join(tokens) == content
    assert len(tokens) == usage["completion_tokens"] == body["usage"]["completion_tokens"] == max_tokens


async def test_text_format_and_text_completions(base: str, http: aiohttp.ClientSession) -> None:
    _, plain = await chat(http, base, max_tokens=3)
    _, text = await chat(http, base, max_tokens=3, response_format={"type": "text"})
    assert text["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"] == " the quick brown"
    request = {"prompt": "hi", "max_tokens": 4, "response_format": {"type": "json_object"}}
    status, body = await post_json(http, f"{base}/v1/completions", request)
    assert status == 200
    assert json.loads(body["choices"][0]["text"]) == {"text": "the quick"}
    tokens, _ = await stream_text(http, f"{base}/v1/completions", request)
    assert "".join(tokens) == body["choices"][0]["text"]


@pytest.mark.parametrize("response_format", [{"type": "yaml"}, {}, {"type": None}, "json_object"])
async def test_unknown_response_formats_are_400(
    base: str, http: aiohttp.ClientSession, response_format: object
) -> None:
    status, body = await chat(http, base, response_format=response_format)
    assert status == 400
    assert body["error"]["type"] == "Bad Request"  # the request model's error, as vLLM's FastAPI answers it
    assert "response_format" in body["error"]["message"]


# --- the request log ---


async def test_the_log_keeps_each_completion_request_as_received(base: str, http: aiohttp.ClientSession) -> None:
    assert await requests_log(http, base) == {"requests": [], "peak_running": 0}
    before = time.time()
    chat_body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, "temperature": 0.3, "x_extra": [1, {"a": 2}]}
    assert (await post_json(http, f"{base}/v1/chat/completions", chat_body))[0] == 200
    text_body = {"prompt": "hi", "stream": True}
    async with http.post(f"{base}/v1/completions", json=text_body) as r:
        await r.read()
    assert (await post_json(http, f"{base}/v1/completions", {"model": "other", "prompt": "x"}))[0] == 404
    async with http.post(f"{base}/v1/chat/completions", data=b"{not json") as r:
        assert r.status == 400
    await post_json(http, f"{base}/tokenize", {"prompt": "not a completion"})
    after = time.time()

    log = await requests_log(http, base)
    assert log["peak_running"] == 1
    entries = log["requests"]
    assert [(e["path"], e["body"]) for e in entries] == [
        ("/v1/chat/completions", chat_body),
        ("/v1/completions", text_body),
        ("/v1/completions", {"model": "other", "prompt": "x"}),
        ("/v1/chat/completions", "{not json"),  # not JSON: its text
    ]
    times = [t for e in entries for t in (e["received"], e["finished"])]
    assert times == sorted(times)  # one at a time, each finished before the next arrived
    assert before <= times[0]
    assert times[-1] <= after


async def test_the_log_leaves_headers_out(http: aiohttp.ClientSession) -> None:
    async with engine_in_process(MODEL, api_key=KEY) as engine:
        headers = {"Authorization": f"Bearer {KEY}"}
        async with http.post(engine.chat_url, json={"messages": MESSAGES}, headers=headers) as r:
            assert r.status == 200
        async with http.get(f"{engine.url}/sim/requests") as r:
            text = await r.text()
        assert json.loads(text)["requests"][0]["body"] == {"messages": MESSAGES}
        assert KEY not in text


async def test_the_log_is_bounded(http: aiohttp.ClientSession) -> None:
    async with engine_in_process(MODEL, request_log=3) as engine:
        for n in range(5):
            assert (await post_json(http, f"{engine.url}/v1/completions", {"prompt": f"p{n}"}))[0] == 200
        log = await requests_log(http, engine.url)
        assert [e["body"]["prompt"] for e in log["requests"]] == ["p2", "p3", "p4"]


async def open_streams(http: aiohttp.ClientSession, base: str, count: int) -> list[aiohttp.ClientResponse]:
    """Paced streams that have each sent their first event, so all of them run at once."""
    responses: list[aiohttp.ClientResponse] = []
    body = {"messages": MESSAGES, "max_tokens": 1000, "stream": True}
    for _ in range(count):
        r = await http.post(f"{base}/v1/chat/completions", json=body)
        responses.append(r)
        async with asyncio.timeout(5):
            assert (await r.content.readline()).startswith(b"data: ")
    return responses


async def until_all_finished(http: aiohttp.ClientSession, base: str) -> Any:
    deadline = time.monotonic() + 5
    while True:
        log = await requests_log(http, base)
        if all(e["finished"] is not None for e in log["requests"]):
            return log
        assert time.monotonic() < deadline, "a request never finished"
        await asyncio.sleep(0.02)


async def test_peak_running_counts_concurrent_requests(http: aiohttp.ClientSession) -> None:
    async with engine_in_process(MODEL, tokens_per_s=50) as engine:
        streams = await open_streams(http, engine.url, 3)
        log = await requests_log(http, engine.url)
        assert log["peak_running"] == 3
        assert [e["finished"] for e in log["requests"]] == [None] * 3
        for r in streams:
            r.close()  # the client leaves: the stream ends at its next write
        log = await until_all_finished(http, engine.url)
        assert log["peak_running"] == 3
        received = [e["received"] for e in log["requests"]]
        assert received == sorted(received)
        assert all(e["finished"] >= received[-1] for e in log["requests"])  # they overlapped

        async with http.delete(f"{engine.url}/sim/requests") as r:
            assert r.status == 204
        assert await requests_log(http, engine.url) == {"requests": [], "peak_running": 0}
        assert (await chat(http, engine.url, max_tokens=1))[0] == 200
        assert (await requests_log(http, engine.url))["peak_running"] == 1


async def test_a_clear_counts_the_requests_still_running(http: aiohttp.ClientSession) -> None:
    async with engine_in_process(MODEL, tokens_per_s=50) as engine:
        [stream] = await open_streams(http, engine.url, 1)
        async with http.delete(f"{engine.url}/sim/requests") as r:
            assert r.status == 204
        assert await requests_log(http, engine.url) == {"requests": [], "peak_running": 1}
        stream.close()
        deadline = time.monotonic() + 5
        while await metric(http, engine.url, "vllm:num_requests_running") != 0:
            assert time.monotonic() < deadline, "the stream never ended"
            await asyncio.sleep(0.02)
        assert (await chat(http, engine.url, max_tokens=1))[0] == 200
        log = await requests_log(http, engine.url)
        assert [e["path"] for e in log["requests"]] == ["/v1/chat/completions"]  # the cleared stream stays out
        assert log["peak_running"] == 1
