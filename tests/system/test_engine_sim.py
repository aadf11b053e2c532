"""The engine simulator speaks vLLM's HTTP API and obeys its fault knobs, in-process and as a command."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.enginesim.server import SimConfig, build_app, engine_sim_command
from tests.support.engines import app_in_process, post_json

MODEL = "sim-model"
KEY = "sk-sim-test-key"
REPO = Path(__file__).resolve().parents[2]
# 3 words + 3, then 3 text words (the image part counts for nothing) + 3, then 3 for the assistant turn.
MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "You are terse."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "Say hi twice"}, {"type": "image_url", "image_url": {"url": "x"}}],
    },
]
CHAT_PROMPT_TOKENS = 15
DEFAULT_FAULTS = {
    "fail_rate": 0.0,
    "hang": False,
    "stall_after_chunks": None,
    "dead": False,
    "tokens_per_s": 0.0,
    "max_num_seqs": None,
}


@asynccontextmanager
async def running(config: SimConfig) -> AsyncIterator[str]:
    async with app_in_process(build_app(config)) as origin:
        yield origin


@pytest.fixture
async def base() -> AsyncIterator[str]:
    async with running(SimConfig(model=MODEL)) as url:
        yield url


async def chat(http: aiohttp.ClientSession, base: str, **extra: Any) -> tuple[int, Any]:
    return await post_json(http, f"{base}/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, **extra})


async def set_faults(http: aiohttp.ClientSession, base: str, **faults: Any) -> Any:
    status, body = await post_json(http, f"{base}/sim/faults", faults)
    assert status == 200
    return body


async def read_stream(r: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    """The decoded chunks of a whole SSE answer, after checking its framing and the final [DONE]."""
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/event-stream")
    text = await r.text()
    assert text.endswith("\n\ndata: [DONE]\n\n")
    blocks = text.split("\n\n")[:-2]
    assert all(block.startswith("data: ") for block in blocks)
    return [json.loads(block.removeprefix("data: ")) for block in blocks]


async def next_event(r: aiohttp.ClientResponse) -> bytes:
    async with asyncio.timeout(5):
        line = await r.content.readline()
        assert line.startswith(b"data: ")
        assert await r.content.readline() == b"\n"
    return line


async def scrape(http: aiohttp.ClientSession, base: str) -> dict[str, float]:
    """Every sample by name (with `le` for buckets), after checking the text parses and the labels."""
    async with http.get(f"{base}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert sample.labels["model_name"] == MODEL
            le = sample.labels.get("le")
            samples[sample.name if le is None else f"{sample.name}[{le}]"] = sample.value
    return samples


async def until_running(http: aiohttp.ClientSession, base: str, count: int) -> None:
    deadline = time.monotonic() + 5
    while (await scrape(http, base))["vllm:num_requests_running"] != count:
        assert time.monotonic() < deadline, f"num_requests_running never reached {count}"
        await asyncio.sleep(0.02)


def words(text: str) -> list[str]:
    assert text.startswith(" ")
    return text.split()


async def test_health_ping_and_models(base: str, http: aiohttp.ClientSession) -> None:
    for path in ("/health", "/ping"):
        async with http.get(f"{base}{path}") as r:
            assert r.status == 200
            assert await r.read() == b""
    async with http.get(f"{base}/v1/models") as r:
        body = await r.json()
    assert isinstance(body["data"][0].pop("created"), int)
    assert body == {
        "object": "list",
        "data": [
            {"id": MODEL, "object": "model", "owned_by": "vllm", "root": MODEL, "parent": None, "max_model_len": 4096}
        ],
    }


async def test_chat_completion_shape(base: str, http: aiohttp.ClientSession) -> None:
    status, body = await chat(http, base, max_tokens=5)
    assert status == 200
    rid = body.pop("id")
    assert re.fullmatch(r"chatcmpl-[0-9a-f]+", rid)
    assert isinstance(body.pop("created"), int)
    [choice] = body.pop("choices")
    content = choice["message"].pop("content")
    assert len(words(content)) == 5
    assert choice == {
        "index": 0,
        "message": {"role": "assistant"},
        "logprobs": None,
        "finish_reason": "length",
        "stop_reason": None,
    }
    assert body == {
        "object": "chat.completion",
        "model": MODEL,
        "usage": {"prompt_tokens": CHAT_PROMPT_TOKENS, "completion_tokens": 5, "total_tokens": CHAT_PROMPT_TOKENS + 5},
    }
    _, again = await chat(http, base, max_tokens=5)
    assert again["choices"][0]["message"]["content"] == content  # deterministic
    assert again["id"] != rid


async def test_completion_length_comes_from_the_request_or_the_config(http: aiohttp.ClientSession) -> None:
    async with running(SimConfig(model=MODEL, max_tokens=4)) as base:
        _, body = await chat(http, base)
        assert body["usage"]["completion_tokens"] == 4
        _, body = await chat(http, base, max_tokens=9)
        assert body["usage"]["completion_tokens"] == 9
        _, body = await chat(http, base, max_tokens=9, max_completion_tokens=7)
        assert len(words(body["choices"][0]["message"]["content"])) == body["usage"]["completion_tokens"] == 7


async def test_text_completion_shape(base: str, http: aiohttp.ClientSession) -> None:
    status, body = await post_json(
        http, f"{base}/v1/completions", {"model": MODEL, "prompt": "one two three four", "max_tokens": 3}
    )
    assert status == 200
    assert re.fullmatch(r"cmpl-[0-9a-f]+", body.pop("id"))
    assert isinstance(body.pop("created"), int)
    [choice] = body.pop("choices")
    assert len(words(choice.pop("text"))) == 3
    assert choice == {"index": 0, "logprobs": None, "finish_reason": "length", "stop_reason": None}
    assert body == {
        "object": "text_completion",
        "model": MODEL,
        "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7},
    }
    # Token-id prompts count one token per id; a list of prompts is a choice each; the model may be left out.
    status, body = await post_json(http, f"{base}/v1/completions", {"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 2})
    assert status == 200
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}


@pytest.mark.parametrize("include_usage", [False, True])
async def test_chat_stream(base: str, http: aiohttp.ClientSession, include_usage: bool) -> None:
    _, reference = await chat(http, base, max_tokens=6)
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    async with http.post(
        f"{base}/v1/chat/completions",
        json={"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "stream": True, **options},
    ) as r:
        chunks = await read_stream(r)
    assert len(chunks) == 1 + 6 + include_usage
    assert len({(c["id"], c["created"]) for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert chunks[0]["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    tokens = chunks[1:7]
    assert [c["choices"][0]["finish_reason"] for c in tokens] == [None] * 5 + ["length"]
    text = "".join(c["choices"][0]["delta"]["content"] for c in tokens)
    assert text == reference["choices"][0]["message"]["content"]
    if include_usage:
        assert all(c["usage"] is None for c in chunks[:-1])
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"] == reference["usage"]
    else:
        assert all("usage" not in c for c in chunks)


@pytest.mark.parametrize("include_usage", [False, True])
async def test_text_completion_stream(base: str, http: aiohttp.ClientSession, include_usage: bool) -> None:
    request = {"model": MODEL, "prompt": "one two three", "max_tokens": 4}
    _, reference = await post_json(http, f"{base}/v1/completions", request)
    options = {"stream_options": {"include_usage": include_usage}}
    async with http.post(f"{base}/v1/completions", json={**request, "stream": True, **options}) as r:
        chunks = await read_stream(r)
    assert len(chunks) == 4 + include_usage
    assert all(c["object"] == "text_completion" and c["model"] == MODEL for c in chunks)
    choices = [c["choices"][0] for c in chunks[:4]]
    assert [c["finish_reason"] for c in choices] == [None, None, None, "length"]
    assert all(c["index"] == 0 and c["logprobs"] is None for c in choices)
    assert "".join(c["text"] for c in choices) == reference["choices"][0]["text"]
    if include_usage:
        assert chunks[-1]["choices"] == []
        assert (
            chunks[-1]["usage"] == reference["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        )


async def test_tokenize_counts_like_the_completions(base: str, http: aiohttp.ClientSession) -> None:
    status, body = await post_json(http, f"{base}/tokenize", {"model": MODEL, "messages": MESSAGES})
    assert status == 200
    assert body["count"] == len(body["tokens"]) == CHAT_PROMPT_TOKENS
    assert body["max_model_len"] == 4096
    assert all(isinstance(t, int) for t in body["tokens"])
    _, prompt = await post_json(http, f"{base}/tokenize", {"prompt": "one two three"})
    _, again = await post_json(http, f"{base}/tokenize", {"prompt": "one two three"})
    assert prompt["count"] == 3
    assert prompt["tokens"] == again["tokens"]
    status, body = await post_json(http, f"{base}/tokenize", {"model": "other", "prompt": "x"})
    assert status == 404
    status, body = await post_json(http, f"{base}/tokenize", {})
    assert status == 400
    assert body["error"]["type"] == "BadRequestError"


async def test_api_key_guards_only_the_v1_routes(http: aiohttp.ClientSession) -> None:
    async with running(SimConfig(model=MODEL, api_key=KEY)) as base:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            async with http.get(f"{base}/v1/models", headers=headers) as r:
                assert r.status == 401
                assert await r.json() == {"error": "Unauthorized"}
            async with http.post(f"{base}/v1/chat/completions", json={"messages": MESSAGES}, headers=headers) as r:
                assert r.status == 401
        good = {"Authorization": f"Bearer {KEY}"}
        async with http.get(f"{base}/v1/models", headers=good) as r:
            assert r.status == 200
        async with http.post(f"{base}/v1/completions", json={"prompt": "hi"}, headers=good) as r:
            assert r.status == 200
        for path in ("/health", "/ping", "/metrics", "/sim/faults"):
            async with http.get(f"{base}{path}") as r:
                assert r.status == 200, path
        async with http.post(f"{base}/tokenize", json={"prompt": "hi"}) as r:
            assert r.status == 200


async def test_wrong_model_is_404(base: str, http: aiohttp.ClientSession) -> None:
    not_found = {
        "error": {"message": "The model `other` does not exist.", "type": "NotFoundError", "param": None, "code": 404}
    }
    assert await post_json(http, f"{base}/v1/chat/completions", {"model": "other", "messages": MESSAGES}) == (
        404,
        not_found,
    )
    assert await post_json(http, f"{base}/v1/completions", {"model": "other", "prompt": "x"}) == (404, not_found)


@pytest.mark.parametrize(
    ("path", "body", "kind"),
    [
        # The request model's errors (pydantic's, through FastAPI): type "Bad Request".
        ("/v1/chat/completions", b"{not json", "Bad Request"),
        ("/v1/chat/completions", b'{"model": "sim-model"}', "Bad Request"),
        ("/v1/chat/completions", b'{"messages": "not a list"}', "Bad Request"),
        ("/v1/chat/completions", b'{"messages": [{"content": "no role"}]}', "Bad Request"),
        ("/v1/completions", b'{"model": "sim-model"}', "Bad Request"),
        ("/v1/completions", b'{"prompt": [[1, 2], "mixed"]}', "Bad Request"),
        ("/v1/completions", b"", "Bad Request"),
        ("/v1/completions", b"[]", "Bad Request"),
        # The serving code's: type "BadRequestError".
        ("/v1/chat/completions", b'{"messages": [], "max_tokens": 0}', "BadRequestError"),
        ("/v1/chat/completions", b'{"messages": [], "max_tokens": 5000}', "BadRequestError"),
    ],
)
async def test_bad_requests_are_400(base: str, http: aiohttp.ClientSession, path: str, body: bytes, kind: str) -> None:
    async with http.post(f"{base}{path}", data=body, headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400
        error = (await r.json())["error"]
    assert isinstance(error.pop("message"), str)
    assert error == {"type": kind, "param": None, "code": 400}


async def test_dead_toggles_health_and_completions(base: str, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{base}/sim/faults") as r:
        assert await r.json() == DEFAULT_FAULTS
    assert await set_faults(http, base, dead=True) == {**DEFAULT_FAULTS, "dead": True}
    async with http.get(f"{base}/health") as r:
        assert r.status == 503
    status, body = await chat(http, base)
    assert status == 500
    assert body["error"]["code"] == 500
    assert await set_faults(http, base, dead=False) == DEFAULT_FAULTS
    async with http.get(f"{base}/health") as r:
        assert r.status == 200
    assert (await chat(http, base))[0] == 200


async def test_fault_patches_are_validated(base: str, http: aiohttp.ClientSession) -> None:
    for patch in (
        {"fail_rate": 2},
        {"stall_after_chunks": -1},
        {"deadly": True},
        {"hang": "yes"},
        {"tokens_per_s": -1},
    ):
        status, _ = await post_json(http, f"{base}/sim/faults", patch)
        assert status == 400, patch
    async with http.get(f"{base}/sim/faults") as r:
        assert await r.json() == DEFAULT_FAULTS


async def test_fail_rate_fails_that_fraction(base: str, http: aiohttp.ClientSession) -> None:
    await set_faults(http, base, fail_rate=0.25)
    statuses = [(await chat(http, base))[0] for _ in range(12)]
    assert statuses.count(500) == 3
    assert statuses.count(200) == 9
    await set_faults(http, base, fail_rate=0)
    assert {(await chat(http, base))[0] for _ in range(4)} == {200}
    async with running(SimConfig(model=MODEL, fail_rate=1.0)) as always:
        status, body = await chat(http, always)
        assert status == 500
        assert body["error"]["type"] == "InternalServerError"


async def test_stall_keeps_the_connection_open_without_chunks(base: str, http: aiohttp.ClientSession) -> None:
    await set_faults(http, base, stall_after_chunks=3)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 10, "stream": True}
    async with http.post(f"{base}/v1/chat/completions", json=body) as r:
        assert r.status == 200
        for _ in range(3):
            await next_event(r)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(r.content.readline(), 0.3)
        await until_running(http, base, 1)
    # Leaving the block dropped the connection: the stalled handler notices and the gauge goes back down.
    await until_running(http, base, 0)
    assert (await scrape(http, base))["vllm:request_success_total"] == 0


async def test_client_disconnect_stops_a_paced_stream(http: aiohttp.ClientSession) -> None:
    async with running(SimConfig(model=MODEL, tokens_per_s=50)) as base:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1000, "stream": True}
        async with http.post(f"{base}/v1/chat/completions", json=body) as r:
            for _ in range(3):
                await next_event(r)
            metrics = await scrape(http, base)
            assert metrics["vllm:num_requests_running"] == 1
            assert metrics["vllm:kv_cache_usage_perc"] > 0
            r.close()
        await until_running(http, base, 0)
        metrics = await scrape(http, base)
        assert metrics["vllm:kv_cache_usage_perc"] == 0
        assert metrics["vllm:request_success_total"] == 0


async def test_hang_never_answers_until_the_client_leaves(base: str, http: aiohttp.ClientSession) -> None:
    await set_faults(http, base, hang=True)
    hung = asyncio.create_task(chat(http, base))
    await until_running(http, base, 1)
    assert not hung.done()
    hung.cancel()  # the client gives up: its connection closes
    with pytest.raises(asyncio.CancelledError):
        await hung
    await until_running(http, base, 0)
    await set_faults(http, base, hang=False)
    assert (await chat(http, base))[0] == 200


async def test_pacing_and_ttft(http: aiohttp.ClientSession) -> None:
    async with running(SimConfig(model=MODEL, ttft_s=0.2, tokens_per_s=100)) as base:
        started = time.monotonic()
        assert (await chat(http, base, max_tokens=11))[0] == 200
        assert time.monotonic() - started >= 0.29  # ttft + 10 gaps of 10 ms
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 11, "stream": True}
        started = time.monotonic()
        async with http.post(f"{base}/v1/chat/completions", json=body) as r:
            await next_event(r)
            assert time.monotonic() - started >= 0.19
            assert len(await read_stream(r)) == 11  # the role chunk was read above
        assert time.monotonic() - started >= 0.29
        metrics = await scrape(http, base)
        assert metrics["vllm:time_to_first_token_seconds_count"] == 2
        assert metrics["vllm:time_to_first_token_seconds_sum"] >= 0.39


async def test_the_pace_set_at_run_time_slows_streams(base: str, http: aiohttp.ClientSession) -> None:
    """An engine started by someone else (a managed replica's) can be made slow for a test."""
    assert await set_faults(http, base, tokens_per_s=100) == {**DEFAULT_FAULTS, "tokens_per_s": 100}
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 11, "stream": True}
    started = time.monotonic()
    async with http.post(f"{base}/v1/chat/completions", json=body) as r:
        assert len(await read_stream(r)) == 12
    assert time.monotonic() - started >= 0.09  # 10 gaps of 10 ms
    await set_faults(http, base, tokens_per_s=0)
    started = time.monotonic()
    assert (await chat(http, base, max_tokens=101))[0] == 200
    assert time.monotonic() - started < 0.5  # unpaced again (paced, it would take a second)


async def test_metrics_count_tokens_requests_and_latencies(base: str, http: aiohttp.ClientSession) -> None:
    before = await scrape(http, base)
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
        "vllm:e2e_request_latency_seconds_count",
    ):
        assert before[name] == 0, name
    await chat(http, base, max_tokens=5)
    await post_json(http, f"{base}/v1/completions", {"prompt": "one two", "max_tokens": 3})
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "stream": True}
    async with http.post(f"{base}/v1/chat/completions", json=body) as r:
        await read_stream(r)
    after = await scrape(http, base)
    assert after["vllm:prompt_tokens_total"] == 2 * CHAT_PROMPT_TOKENS + 2
    assert after["vllm:generation_tokens_total"] == 5 + 3 + 4
    assert after["vllm:request_success_total"] == 3
    for histogram in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds"):
        assert after[f"{histogram}_count"] == 3
        assert after[f"{histogram}_bucket[+Inf]"] == 3
        assert after[f"{histogram}_sum"] > 0
        buckets = [v for k, v in after.items() if k.startswith(f"{histogram}_bucket")]
        assert buckets == sorted(buckets)  # cumulative


def test_command_line_options() -> None:
    result = CliRunner().invoke(engine_sim_command, ["--help"])
    assert result.exit_code == 0
    for option in (
        "--host",
        "--port",
        "--model",
        "--api-key",
        "--startup-delay",
        "--tokens-per-s",
        "--ttft",
        "--max-tokens",
        "--max-logprobs",
        "--fail-rate",
        "--hang",
        "--crash-after",
        "--stall-after-chunks",
        "--request-log",
    ):
        assert option in result.output
    assert CliRunner().invoke(engine_sim_command, []).exit_code == 2  # --model is required


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def sim_process(*args: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """`python -m orchestrator.enginesim.server` on a free port, once it printed its start line."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "orchestrator.enginesim", "--model", MODEL, "--port", str(port), *args),
        cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        assert b"engine-sim" in await asyncio.wait_for(proc.stderr.readline(), 30)
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.communicate()


async def health_status(http: aiohttp.ClientSession, base: str) -> int | None:
    """The /health status, or None while nothing listens."""
    try:
        async with http.get(f"{base}/health") as r:
            return r.status
    except aiohttp.ClientConnectorError:
        return None


async def until_healthy(http: aiohttp.ClientSession, base: str) -> None:
    deadline = time.monotonic() + 30
    while await health_status(http, base) != 200:
        assert time.monotonic() < deadline, "the simulator never came up"
        await asyncio.sleep(0.02)


async def test_startup_delay_keeps_the_port_closed(http: aiohttp.ClientSession) -> None:
    async with sim_process("--startup-delay", "1.5") as (proc, base):
        started = time.monotonic()
        assert await health_status(http, base) is None
        await until_healthy(http, base)
        assert time.monotonic() - started > 0.5
        assert proc.returncode is None


async def test_crash_after_exits_the_process(http: aiohttp.ClientSession) -> None:
    async with sim_process("--crash-after", "2") as (proc, base):
        await until_healthy(http, base)
        assert [(await chat(http, base))[0] for _ in range(2)] == [200, 200]
        with pytest.raises(aiohttp.ClientConnectionError):
            await chat(http, base)
        assert await asyncio.wait_for(proc.wait(), 10) == 1


async def test_max_num_seqs_makes_a_queue_counted_as_waiting(http: aiohttp.ClientSession) -> None:
    """As vLLM's --max-num-seqs: two run at once, the other three wait (first come first) until they run."""
    async with running(SimConfig(model=MODEL, max_num_seqs=2, tokens_per_s=20)) as url:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 10}
        calls = [asyncio.create_task(post_json(http, f"{url}/v1/chat/completions", body)) for _ in range(5)]
        async with asyncio.timeout(5):
            while (metrics := await scrape(http, url))["vllm:num_requests_waiting"] < 3:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert metrics["vllm:num_requests_running"] == 2
        assert [status for status, _ in await asyncio.gather(*calls)] == [200] * 5
        after = await scrape(http, url)
        assert (after["vllm:num_requests_waiting"], after["vllm:num_requests_running"]) == (0, 0)


async def test_max_num_seqs_set_at_run_time_makes_and_lets_go_a_queue(base: str, http: aiohttp.ClientSession) -> None:
    """An engine started by someone else (a managed replica's) can be made a queue, and its line let in at once."""
    assert (await set_faults(http, base, max_num_seqs=1, tokens_per_s=10))["max_num_seqs"] == 1
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 50}  # 5 s each, paced
    calls = [asyncio.create_task(post_json(http, f"{base}/v1/chat/completions", body)) for _ in range(4)]
    async with asyncio.timeout(5):
        while (await scrape(http, base))["vllm:num_requests_waiting"] < 3:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    await set_faults(http, base, max_num_seqs=None, tokens_per_s=0)  # no limit: the three waiting run at once
    await until_running(http, base, 0)
    assert [status for status, _ in await asyncio.gather(*calls)] == [200] * 4
    status, _ = await post_json(http, f"{base}/sim/faults", {"max_num_seqs": 0})
    assert status == 400
