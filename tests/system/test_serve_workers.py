"""`orchestrator serve --workers N`: N granian workers of the same app on one database, exactly one of them leading
the fleet's jobs; refused without Redis, where each worker would keep limits of its own; a worker killed outright is
started again, and the calls it had answered are charged once."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import httpx

from orchestrator.domain.money import UNIT
from tests.support.engines import engine_process
from tests.support.redis import RedisServer
from tests.support.server import ORCHESTRATOR, orch_env, poll, serving
from tests.system.test_money_crash import ADMIN_HEADERS, MODEL, metered_key, threads_of

ADMIN = "sk-serve-workers-admin-key-0123456789"


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def _children(parent: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if _status(int(entry.name))["PPid"] == str(parent):
                    children.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError):  # ended while listed
                continue
    return children


def test_several_workers_without_redis_are_refused_at_start(tmp_path: Path) -> None:
    serve = [*ORCHESTRATOR, "serve", "--workers", "2"]
    done = subprocess.run(serve, env=orch_env(tmp_path), capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "--workers 2 needs ORCH_REDIS_URL" in done.stderr
    assert not (tmp_path / "orchestrator.db").exists()  # nothing started


def test_two_workers_serve_one_database_and_exactly_one_leads(tmp_path: Path, redis_server: RedisServer) -> None:
    state = tmp_path / "state"
    env = {
        "ORCH_REDIS_URL": redis_server.url,
        "ORCH_DEPLOYMENT": RedisServer.new_namespace(),
        "ORCH_ADMIN_API_KEY": ADMIN,
        "ORCH_LOG_LEVEL": "WARNING",
    }
    headers = {"Authorization": f"Bearer {ADMIN}"}
    lock = state / "orchestrator.db.leader"
    with serving(state, "--workers", "2", env=env) as (base, _):
        leader = int(poll(lock.read_text, lambda text: text.strip() != "").strip().rsplit(":", 1)[1])
        granian = int(_status(leader)["PPid"])
        workers = poll(lambda: sorted(_children(granian)), lambda found: len(found) == 2)
        assert leader in workers

        # Each request lands on either worker: both answer from the one database, and the leader's jobs run.
        model = httpx.post(f"{base}/api/v1/models", json={"name": "llama"}, headers=headers).json()
        r = httpx.post(
            f"{base}/api/v1/models/{model['id']}/replicas", json={"endpoint": "http://127.0.0.1:91/v1"}, headers=headers
        )
        replica_id = r.json()["replica_id"]
        for _ in range(8):
            assert httpx.get(f"{base}/api/v1/models", headers=headers).json() == [{"id": model["id"], "name": "llama"}]
        poll(
            lambda: httpx.get(f"{base}/api/v1/replicas/{replica_id}", headers=headers).json()["status"],
            lambda status: status == "STARTING",
        )
        assert lock.read_text().strip().endswith(f":{leader}")  # still the same leader


def test_a_worker_killed_outright_comes_back_and_its_answered_calls_are_charged_once(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    state = tmp_path / "state"
    env = {
        "ORCH_REDIS_URL": redis_server.url,
        "ORCH_DEPLOYMENT": RedisServer.new_namespace(),
        "ORCH_ADMIN_API_KEY": ADMIN_HEADERS["Authorization"].removeprefix("Bearer "),
        "ORCH_LOG_LEVEL": "WARNING",
        "ORCH_PROBE_STARTING_INTERVAL_S": "0.2",
        "ORCH_USAGE_FLUSH_INTERVAL_S": "3600",  # the records job never writes: answered calls wait in the journal
    }
    journal = state / "journal"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with engine_process(MODEL) as (engine, _), serving(state, "--workers", "2", env=env) as (base, _):
        key_id, key = metered_key(base, engine.chat_url)
        lock = state / "orchestrator.db.leader"
        granian = int(_status(int(poll(lock.read_text, lambda text: text.strip() != "").rsplit(":", 1)[1]))["PPid"])
        workers = poll(lambda: sorted(_children(granian)), lambda found: len(found) == 2)

        def journaled() -> set[int]:
            return {int(p.name.split("-", 1)[0]) for p in journal.glob("*.seg")}

        answered = 0

        def call() -> int:
            nonlocal answered
            with httpx.Client() as fresh:  # a new connection each time: granian spreads them over the workers
                r = fresh.post(f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            answered += r.status_code == 200
            return r.status_code

        # Each worker learns of the key's binding from the change feed: until then, it refuses the model.
        poll(lambda: [call() for _ in range(8)], lambda statuses: statuses == [200] * 8)
        while len(journaled() & set(workers)) < 2:  # each worker holds answered calls not yet written
            assert call() == 200
            assert answered < 200, "the calls never reached both workers"
        victim = workers[0]
        os.kill(victim, signal.SIGKILL)

        back = poll(lambda: sorted(_children(granian)), lambda found: len(found) == 2 and victim not in found)
        assert back[0] != victim
        poll(journaled, lambda owners: victim not in owners)  # replayed by the worker that replaced it
        written = poll(threads_of(base, key_id), lambda d: d["total"] > 0)["total"]
        assert written < answered  # the victim's calls, not the survivor's (still waiting for the flush)
        assert call() == 200  # served all along
    # Stopped cleanly: the survivor and the new worker wrote theirs; every answered call once, and charged once.
    with serving(state, env=env) as (base, _):
        threads = threads_of(base, key_id)()
        detail = httpx.get(f"{base}/admin/api-key/detail/{key_id}", headers=ADMIN_HEADERS).json()["data"]
    assert threads["total"] == answered
    [fee] = {round(t["fee"] * UNIT) for t in threads["items"]}
    assert round(detail["total_fee"] * UNIT) == answered * fee
