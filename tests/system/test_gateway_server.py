"""The gateway as it runs: `orchestrator serve` and `orchestrator engine-sim` processes, the openai SDK over sockets."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import openai

from tests.support.engines import engine_process
from tests.support.server import serving

MODEL = "llama"


def _running(engine_url: str) -> float:
    text = httpx.get(f"{engine_url}/metrics").text
    return sum(float(v) for v in re.findall(r"^vllm:num_requests_running\{[^}]*\} (\S+)$", text, re.MULTILINE))


def test_sdk_over_sockets_and_a_client_that_walks_away_stops_the_engine(tmp_path: Path) -> None:
    state = tmp_path / "state"
    # 40 tokens/s for 400 tokens: a stream of 10 s that only a cancellation can end early.
    with (
        engine_process(MODEL, "--tokens-per-s", "40", "--max-tokens", "400") as (engine, _),
        serving(state, env={"ORCH_PROBE_STARTING_INTERVAL_S": "0.2"}) as (base, _),
    ):
        admin = {"Authorization": f"Bearer {(state / 'admin_api_key').read_text().strip()}"}
        model_id = httpx.post(f"{base}/api/v1/models", json={"name": MODEL}, headers=admin).json()["id"]
        replica = httpx.post(
            f"{base}/api/v1/models/{model_id}/replicas", json={"endpoint": engine.chat_url}, headers=admin
        ).json()["replica_id"]
        deadline = time.monotonic() + 20
        while httpx.get(f"{base}/api/v1/replicas/{replica}", headers=admin).json()["status"] != "READY":
            assert time.monotonic() < deadline, "the replica never became READY"
            time.sleep(0.05)
        key = httpx.post(f"{base}/api/v1/generate_api_key", json={"user_id": "u"}, headers=admin).json()["api_key"]
        sdk = openai.OpenAI(api_key=key, base_url=f"{base}/v1", max_retries=0)

        answer = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert answer.usage is not None
        assert answer.usage.completion_tokens == 2

        stream = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True)
        for i, _chunk in enumerate(stream):
            if i == 3:
                break
        assert _running(engine.url) == 1
        stream.close()  # the client goes away mid-stream
        deadline = time.monotonic() + 10
        while _running(engine.url) != 0:
            assert time.monotonic() < deadline, "the engine kept generating for a client that left"
            time.sleep(0.05)
        deadline = time.monotonic() + 10
        while "gateway_inflight_requests 0.0" not in httpx.get(f"{base}/metrics").text:
            assert time.monotonic() < deadline, "the gateway kept an in-flight slot"
            time.sleep(0.05)
