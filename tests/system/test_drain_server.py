"""Draining as it runs: `orchestrator serve` (its scheduler running the reconcile job) in front of `engine-sim`
processes, clients streaming over sockets while their replica is deleted, `ORCH_DRAIN_TIMEOUT_S` read from the
environment."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from tests.support.engines import Engine, engine_process
from tests.support.server import poll, serving

SLOW, HUNG = "slow-model", "hung-model"
TIMEOUT_S = 3


def _running(engine: Engine) -> int:
    requests = httpx.get(f"{engine.url}/sim/requests").json()["requests"]
    return len([r for r in requests if r["path"] == "/v1/chat/completions" and r["finished"] is None])


def _ready_replica(base: str, admin: dict[str, str], model: str, engine: Engine) -> int:
    model_id = httpx.post(f"{base}/api/v1/models", json={"name": model}, headers=admin).json()["id"]
    r = httpx.post(f"{base}/api/v1/models/{model_id}/replicas", json={"endpoint": engine.chat_url}, headers=admin)
    replica_id = int(r.json()["replica_id"])
    poll(lambda: _replica(base, admin, replica_id)["status"], lambda status: status == "READY")
    return replica_id


def _replica(base: str, admin: dict[str, str], replica_id: int) -> dict[str, Any]:
    detail: dict[str, Any] = httpx.get(f"{base}/api/v1/replicas/{replica_id}", headers=admin).json()
    return detail


def _out_of_draining(detail: dict[str, Any]) -> dict[str, Any]:
    [event] = [e for e in detail["events"] if e["from_status"] == "DRAINING"]
    return event


def _chat(base: str, key: str, model: str, **extra: object) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, **extra}
    with httpx.stream(
        "POST", f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as r:
        return f"{r.status_code} " + "".join(r.iter_text())


def test_a_deleted_replica_finishes_its_streams_and_a_hung_call_waits_only_the_drain_timeout(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {"ORCH_PROBE_STARTING_INTERVAL_S": "0.2", "ORCH_DRAIN_TIMEOUT_S": str(TIMEOUT_S)}
    with (
        engine_process(SLOW, "--tokens-per-s", "10") as (slow, _),  # 16 tokens: streams of 1.5 s
        engine_process(HUNG) as (hung, _),
        serving(state, env=env) as (base, _),
        ThreadPoolExecutor(4) as clients,
    ):
        admin = {"Authorization": f"Bearer {(state / 'admin_api_key').read_text().strip()}"}
        leaving = _ready_replica(base, admin, SLOW, slow)
        stuck = _ready_replica(base, admin, HUNG, hung)
        key = httpx.post(f"{base}/api/v1/generate_api_key", json={"user_id": "u"}, headers=admin).json()["api_key"]

        streams = [clients.submit(_chat, base, key, SLOW, stream=True) for _ in range(3)]
        poll(lambda: _running(slow), lambda n: n == 3)
        assert httpx.delete(f"{base}/api/v1/replicas/{leaving}", headers=admin).status_code == 204
        deadline = time.monotonic() + 30
        while not all(s.done() for s in streams):  # 1.5 s of streams: passes of the job (every second) see them
            status = _replica(base, admin, leaving)["status"]
            assert status == "DRAINING" or _running(slow) == 0, status  # read in this order: it moved, so they ended
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for answer in [s.result() for s in streams]:
            assert answer.startswith("200 ")
            assert answer.rstrip().endswith("data: [DONE]"), answer[-300:]  # whole
        done = poll(lambda: _replica(base, admin, leaving), lambda d: d["status"] == "TERMINATED", timeout_s=10)
        drained = _out_of_draining(done)
        assert drained["reason"] == "drained"
        assert drained["message"].startswith("drained: 3 in-flight calls finished in "), drained["message"]

        httpx.post(f"{hung.url}/sim/faults", json={"hang": True}).raise_for_status()
        call: Future[str] = clients.submit(_chat, base, key, HUNG)
        poll(lambda: _running(hung), lambda n: n == 1)
        deleted = time.monotonic()
        assert httpx.delete(f"{base}/api/v1/replicas/{stuck}", headers=admin).status_code == 204
        done = poll(lambda: _replica(base, admin, stuck), lambda d: d["status"] == "TERMINATED", timeout_s=15)
        assert time.monotonic() - deleted >= TIMEOUT_S - 0.5  # the stored move's clock, not this one
        assert _out_of_draining(done)["message"] == f"drain timeout after {TIMEOUT_S} s: 1 in-flight call cut"
        assert call.result(timeout=10).startswith("502 ")  # cut by the gateway: the engine still hangs
