"""Every answered call is charged exactly once, against real server processes: a stream the client drops just
before the engine's usage chunk is charged for what it got, and a kill -9 in the middle of a load of metered calls
leaves as many charged records as answered calls (the journal replayed at the next start), on SQLite and
PostgreSQL, whether the records job wrote nothing before the kill or was writing all along."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator.domain.money import UNIT
from tests.support.aio import run_in_thread
from tests.support.engines import engine_process
from tests.support.postgres import PostgresServer
from tests.support.server import poll, serving

ADMIN = "sk-money-crash-admin-key-0123456789"
MODEL = "metered"
ENV = {"ORCH_ADMIN_API_KEY": ADMIN, "ORCH_PROBE_STARTING_INTERVAL_S": "0.2", "ORCH_LOG_LEVEL": "WARNING"}
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
CALLERS = 8


def metered_key(base: str, chat_url: str) -> tuple[int, str]:
    """A priced model served by the engine, and a connector key bound to it with a large quota."""
    r = httpx.post(
        f"{base}/admin/model/save",
        json={"name": MODEL, "provider": "vllm", "price_in": 1, "price_out": 3},
        headers=ADMIN_HEADERS,
    )
    model_id = r.json()["data"]["id"]
    r = httpx.post(f"{base}/api/v1/models/{model_id}/replicas", json={"endpoint": chat_url}, headers=ADMIN_HEADERS)
    replica = r.json()["replica_id"]
    poll(lambda: httpx.get(f"{base}/api/v1/replicas/{replica}", headers=ADMIN_HEADERS).json(), _ready)
    return bound_key(base, model_id)


def bound_key(base: str, model_id: int, name: str = "payer") -> tuple[int, str]:
    """A new connector key with a large quota, bound to the model."""
    data = httpx.post(
        f"{base}/admin/api-key/apply", json={"name": name, "month_quota": 100}, headers=ADMIN_HEADERS
    ).json()["data"]
    r = httpx.post(
        f"{base}/admin/api-key/bind-or-unbind-model",
        json={"key_id": data["id"], "model_id": model_id},
        headers=ADMIN_HEADERS,
    )
    assert r.json()["success"], r.text
    return int(data["id"]), str(data["api_key"])


def _ready(body: dict[str, Any]) -> bool:
    return body.get("status") == "READY"


def threads_of(base: str, key_id: int) -> Callable[[], dict[str, Any]]:
    url = f"{base}/admin/thread/list?key_id={key_id}&limit=1000"
    return lambda: httpx.get(url, headers=ADMIN_HEADERS).json()["data"]


def test_a_stream_dropped_just_before_its_usage_chunk_is_charged(tmp_path: Path) -> None:
    with engine_process(MODEL, "--tokens-per-s", "40") as (engine, _), serving(tmp_path, env=ENV) as (base, _):
        key_id, key = metered_key(base, engine.chat_url)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "tell me"}], "max_tokens": 90, "stream": True}
        got = 0
        with httpx.stream(
            "POST", f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30
        ) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                    got += 1
                if got == 20:
                    break  # the client hangs up long before the usage chunk
        [thread] = poll(threads_of(base, key_id), lambda d: d["total"] == 1)["items"]
        assert thread["tokens_out"] >= 20
        assert thread["tokens_in"] > 0
        assert thread["fee"] > 0
        detail = httpx.get(f"{base}/admin/api-key/detail/{key_id}", headers=ADMIN_HEADERS).json()["data"]
        assert round(detail["month_fee"] * UNIT) == round(thread["fee"] * UNIT)


def _load(base: str, key: str, stop: threading.Event, answered: list[int]) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with httpx.Client(timeout=10) as c:
        while not stop.is_set():
            try:
                r = c.post(f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            except httpx.TransportError:
                return  # the server is gone
            if r.status_code == 200:
                assert r.json()["usage"]["completion_tokens"] == 4
                answered.append(1)


@pytest.mark.parametrize("flush_interval", ["3600", "0.05"], ids=["never-flushed", "flushing"])
@pytest.mark.parametrize("database", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_kill_9_under_load_leaves_every_answered_call_charged(
    tmp_path: Path, request: pytest.FixtureRequest, flush_interval: str, database: str
) -> None:
    env = ENV | {"ORCH_USAGE_FLUSH_INTERVAL_S": flush_interval}
    if database == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres")
        env["ORCH_DATABASE_URL"] = run_in_thread(server.new_database)
    answered: list[int] = []
    stop = threading.Event()
    with engine_process(MODEL) as (engine, _):
        with serving(tmp_path, env=env, stop_signal=signal.SIGKILL) as (base, _):
            key_id, key = metered_key(base, engine.chat_url)
            callers = [threading.Thread(target=_load, args=(base, key, stop, answered)) for _ in range(CALLERS)]
            for caller in callers:
                caller.start()
            poll(lambda: len(answered), lambda n: n >= 150)
        # killed with every process of the server, callers still calling
        stop.set()
        for caller in callers:
            caller.join()
        with serving(tmp_path, env=env) as (base, _):
            threads = threads_of(base, key_id)()
            detail = httpx.get(f"{base}/admin/api-key/detail/{key_id}", headers=ADMIN_HEADERS).json()["data"]
    # Every answered call is charged; at most the calls in flight at the kill are charged without their answer.
    assert len(answered) <= threads["total"] <= len(answered) + CALLERS, (len(answered), threads["total"])
    fees = {round(t["fee"] * UNIT) for t in threads["items"]}
    [one] = fees  # the calls are all alike
    assert round(detail["total_fee"] * UNIT) == threads["total"] * one  # and charged exactly once
