"""The Hyperstack toolkit's own UI and clients against this server, unchanged: the playground's chat (streamed as
bare JSON lines, and whole), its SDK clients streaming SSE on the toolkit's route, and "Deploy new replica on
Hyperstack" with the rules the UI always sends. Each body is the one the UI posts, each answer read as the UI reads
it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from orchestrator.platform.settings import Settings
from orchestrator.runtime.container import Deps
from tests.support.engines import Engine, engine_in_process
from tests.support.gateway import make_ready
from tests.support.settings import instance_settings
from tests.support.toolkit import create_model

MODEL = "NousResearch/Meta-Llama-3.1-8B-Instruct"
ENGINE_PORT = 8000


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    # SSH on 22, as on Hyperstack and the machine backend, since the UI's rules name 22 (no VM is started here).
    return instance_settings(tmp_path / "state", database_url).model_copy(update={"sandbox_ssh_port": 22})


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    async with engine_in_process(MODEL) as e:
        yield e


@pytest.fixture
async def ui_key(client: httpx.AsyncClient, deps: Deps, engine: Engine) -> str:
    """The model served by a READY replica, and the key the playground generates for user 0."""
    await make_ready(client, deps, MODEL, engine.chat_url)
    r = await client.post("/api/v1/generate_api_key", json={"user_id": str(0)})  # playground.generate_api_key
    assert r.status_code == 200, r.text
    return str(r.json()["api_key"])


def playground_body(stream: bool, prompt: str = "Hi, how are you?") -> dict[str, Any]:
    """What playground.py posts for one chat message, with DEFAULT_ASSISTANT_CONFIGS (the stream box ticked or
    not)."""
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": prompt}]
    return {
        "model": MODEL,
        "messages": messages,
        "stream": stream,
        "raw_stream_response": False,
        "temperature": 0.7,
        "max_tokens": 24,  # the UI's default is 512; fewer keeps the test short, the shape is the same
        "presence_penalty": 0.7,
        "frequency_penalty": 0.6,
    }


def ui_headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


async def test_playground_streams_bare_json_lines_and_the_call_is_recorded_once(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, ui_key: str, engine: Engine, deps: Deps
) -> None:
    content = ""
    async with anon_client.stream(
        "POST", "/api/v1/chat/completions", json=playground_body(True), headers=ui_headers(ui_key)
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
    # playground.stream_response: every non-empty line is one JSON document whose first choice has a delta.
    for chunk in raw.splitlines():
        if chunk:
            delta = json.loads(chunk.decode("utf-8").strip())["choices"][0]["delta"]
            if part := delta.get("content"):
                content += part
    assert content.strip()
    assert raw.endswith(b"}\n")
    assert b"data:" not in raw
    assert b"[DONE]" not in raw
    [sent] = await engine.chats()
    assert "raw_stream_response" not in sent["body"]  # the toolkit keeps it to itself
    assert sent["body"]["stream_options"] == {"include_usage": True}
    # The engine's usage chunk is not shown, but the call is recorded (and billed) once, with it.
    assert await deps.records.flush() == 1
    [row] = (await client.get("/api/v1/tables/metric")).json()["data"]
    assert (row["status_code"], row["completion_tokens"]) == (200, 24)
    assert row["prompt_tokens"] > 0


async def test_playground_whole_answer(anon_client: httpx.AsyncClient, ui_key: str, engine: Engine) -> None:
    response = await anon_client.post(
        "/api/v1/chat/completions", json=playground_body(False), headers=ui_headers(ui_key)
    )
    assert response.status_code == 200, response.text
    content = response.json()["choices"][0]["message"]["content"]
    assert content
    [sent] = await engine.chats()
    assert "raw_stream_response" not in sent["body"]
    assert "stream_options" not in sent["body"]


async def test_raw_stream_response_true_is_sse_without_the_usage_event_or_done(
    anon_client: httpx.AsyncClient, ui_key: str
) -> None:
    body = {**playground_body(True), "raw_stream_response": True, "max_tokens": 5}
    response = await anon_client.post("/api/v1/chat/completions", json=body, headers=ui_headers(ui_key))
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    events = response.content.split(b"\n\n")
    assert events[-1] == b""  # each event ends with its blank line
    documents = [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    assert all(e.startswith(b"data: {") for e in events[:-1])
    assert all(d["choices"] for d in documents)
    assert "".join(d["choices"][0]["delta"].get("content") or "" for d in documents).strip()


async def test_the_toolkits_sdk_clients_stream_on_its_route(
    transport: httpx.ASGITransport, ui_key: str, deps: Deps
) -> None:
    # The toolkit's backend tests (test_chat_streaming): the SDK on /api/v1, raw_stream_response left at its
    # default, and `chunk.choices[0]` read on every chunk.
    http = httpx.AsyncClient(transport=transport, base_url="http://testserver")
    sdk = openai.AsyncOpenAI(api_key=ui_key, base_url="http://testserver/api/v1", http_client=http, max_retries=0)
    messages: Any = [
        {"role": "system", "content": "you are a helpful assistant"},
        {"role": "user", "content": "what is 1+1?"},
    ]
    whole = await sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0.0)
    stream = await sdk.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0.0, stream=True
    )
    chunks: list[str] = []
    finish_reasons = 0
    async for chunk in stream:
        delta = chunk.choices[0].delta
        if delta.content:
            chunks.append(delta.content)
        if chunk.choices[0].finish_reason is not None:
            finish_reasons += 1
    assert finish_reasons == 1
    assert "".join(chunks) == whole.choices[0].message.content
    assert await deps.records.flush() == 2


async def test_deploy_new_replica_on_hyperstack_with_the_uis_rules(client: httpx.AsyncClient) -> None:
    model_id = await create_model(client, MODEL)
    port = ENGINE_PORT  # the UI's port box, 8000 by default
    # models.create_replica(should_create_vm=True): the endpoint box emptied, and the two rules it always adds.
    data: dict[str, Any] = {"endpoint": "", "create_vm": True}
    data["vm_creation_details"] = {
        "name": "llama-replica",
        "environment_name": "default-CANADA-1",
        "image_name": "Ubuntu Server 22.04 LTS R535 CUDA 12.2",
        "flavor_name": "n3-A100x1",
        "run_command": f"docker run -d --gpus all -p 8000:8000 vllm/vllm-openai:latest --model {MODEL}",
        "key_name": "ops",
        "port": port,
        "security_rules": [
            {"port_range_min": port, "port_range_max": port},
            {"port_range_min": 22, "port_range_max": 22},
        ],
    }
    r = await client.post(f"/api/v1/models/{model_id}/replicas", json=data)
    assert r.status_code == 201, r.text
    replica_id = r.json()["replica_id"]

    # models.model_card: the list the UI draws its rows from.
    r = await client.get(f"/api/v1/models/{model_id}/replicas")
    assert r.status_code == 200
    [replica] = r.json()
    assert replica["id"] == replica_id
    assert not replica["error_message"]
    assert replica["vm_status"] == "PENDING"  # the spinner

    detail = (await client.get(f"/api/v1/replicas/{replica_id}")).json()
    assert all(rule["remote_ip_prefix"] != "0.0.0.0/0" for rule in detail["security_rules"])
    [replaced] = [e for e in detail["events"] if e["reason"] == "rules_replaced"]
    assert "security_rules[0]" in replaced["message"]
    assert "security_rules[1]" in replaced["message"]
    assert "0.0.0.0/0" in replaced["message"]


async def test_deploy_with_the_command_box_left_empty_runs_the_engine_spec(client: httpx.AsyncClient) -> None:
    """The UI's command box is empty by default and is sent as "": the replica runs the default engine spec."""
    model_id = await create_model(client, MODEL)
    details = {
        "name": "llama-replica",
        "environment_name": "default-CANADA-1",
        "image_name": "Ubuntu Server 22.04 LTS R535 CUDA 12.2",
        "flavor_name": "n3-A100x1",
        "run_command": "",
        "key_name": "ops",
        "port": ENGINE_PORT,
        "security_rules": [],
    }
    r = await client.post(
        f"/api/v1/models/{model_id}/replicas", json={"create_vm": True, "vm_creation_details": details}
    )
    assert r.status_code == 201, r.text
    detail = (await client.get(f"/api/v1/replicas/{r.json()['replica_id']}")).json()
    assert detail["run_command"] is None
    assert detail["engine"]["image"].startswith("vllm/vllm-openai")
