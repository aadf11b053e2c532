"""A queued LlmEndpoint completion survives a crash: real `orchestrator serve` processes on one state dir, a real
engine simulator process, SIGKILL while the task is `processing`; the next server runs it to completion."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from orchestrator.surfaces.llmendpoint.completions import parse
from tests.support.engines import engine_process
from tests.support.server import poll, serving

ADMIN = "sk-task-queue-admin-key-0123456789"
MODEL = "llama3.1"  # priced in the seeded rate table
# 12 tokens at 4 tokens/s: about 3 s per answer, time enough to kill the server mid-call; the engine's 1-token
# health probes answer at once.
BODY = {"messages": [{"role": "user", "content": "Tell me a story."}], "model": MODEL, "max_tokens": 12}
ENV = {"ORCH_ADMIN_API_KEY": ADMIN, "ORCH_PROBE_STARTING_INTERVAL_S": "0.2"}
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}


def ready_model_and_funded_key(base: str, chat_url: str) -> str:
    model_id = httpx.post(f"{base}/api/v1/models", json={"name": MODEL}, headers=ADMIN_HEADERS).json()["id"]
    r = httpx.post(f"{base}/api/v1/models/{model_id}/replicas", json={"endpoint": chat_url}, headers=ADMIN_HEADERS)
    replica = r.json()["replica_id"]
    poll(lambda: httpx.get(f"{base}/api/v1/replicas/{replica}", headers=ADMIN_HEADERS).json(), _is("READY"))
    issued = httpx.post(f"{base}/api/v1/generate_api_key", json={"user_id": "q"}, headers=ADMIN_HEADERS).json()
    r = httpx.post(f"{base}/admin/api-key/recharge", json={"id": issued["id"], "balance": "1"}, headers=ADMIN_HEADERS)
    assert r.json()["success"], r.text
    return str(issued["api_key"])


def _is(*statuses: str) -> Callable[[dict[str, Any]], bool]:
    return lambda body: body.get("status") in statuses


def task_of(base: str, key: str, task_id: str) -> Callable[[], dict[str, Any]]:
    return lambda: httpx.get(f"{base}/api/v1/qcompletions/{task_id}", headers={"Authorization": key}).json()


def test_a_task_processing_when_the_server_is_killed_completes_after_the_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with engine_process(MODEL, "--tokens-per-s", "4") as (engine, _):
        # What the engine answers this request (it is deterministic): asked directly, not through the queue.
        engine_body = parse(json.dumps(BODY).encode(), stream_allowed=False).engine_body
        expected = httpx.post(engine.chat_url, content=engine_body, timeout=30).json()["choices"][0]["message"]
        with serving(state, env=ENV, stop_signal=signal.SIGKILL) as (base, _):
            key = ready_model_and_funded_key(base, engine.chat_url)
            r = httpx.post(f"{base}/api/v1/qcompletions", json=BODY, headers={"Authorization": key})
            assert r.status_code == 200, r.text
            task_id = r.json()["task_id"]
            poll(task_of(base, key, task_id), _is("processing"))
        # SIGKILLed in the middle of the engine's answer: the row is left `processing`.

        with serving(state, env=ENV) as (base, output):
            done = poll(task_of(base, key, task_id), _is("completed", "failed"))
            assert done["status"] == "completed", done
            assert done["result"] == expected["content"]
            assert done["completed_at"] is not None
        logged = [json.loads(line) for line in output[0].splitlines() if line.startswith("{")]
        assert any(e["event"] == "tasks.recovered" and e["requeued"] == 1 for e in logged), output[0][-2000:]
