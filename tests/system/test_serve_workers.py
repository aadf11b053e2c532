"""`orchestrator serve --workers N`: N granian workers of the same app on one database, exactly one of them leading
the fleet's jobs; refused without Redis, where each worker would keep limits of its own; a change made through one
worker reaches the others at once (over Redis, on SQLite); a worker killed outright is started again, and the calls it
had answered are charged once."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx

from orchestrator.domain.money import UNIT
from tests.support.engines import engine_process
from tests.support.redis import RedisServer
from tests.support.server import ORCHESTRATOR, free_port, orch_env, poll, serving
from tests.system.test_money_crash import ADMIN_HEADERS, MODEL, bound_key, metered_key, threads_of

ADMIN = "sk-serve-workers-admin-key-0123456789"
METERED = ADMIN_HEADERS["Authorization"].removeprefix("Bearer ")
"""The admin key of the tests that make a metered key (with `metered_key`, which calls as that admin)."""


def _on_redis(redis_server: RedisServer, admin: str = ADMIN) -> dict[str, str]:
    """A server's environment for `--workers 2`: Redis, a deployment of its own, the admin key, fast probes."""
    return {
        "ORCH_REDIS_URL": redis_server.url,
        "ORCH_DEPLOYMENT": RedisServer.new_namespace(),
        "ORCH_ADMIN_API_KEY": admin,
        "ORCH_LOG_LEVEL": "WARNING",
        "ORCH_PROBE_STARTING_INTERVAL_S": "0.2",
    }


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


def test_a_stop_while_the_workers_still_build_the_app_stops_the_server(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    env = orch_env(tmp_path / "state") | _on_redis(redis_server)
    serve = [*ORCHESTRATOR, "serve", "--host", "127.0.0.1", "--port", str(free_port()), "--workers", "2"]
    proc = subprocess.Popen(
        serve, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        workers = poll(lambda: sorted(_children(proc.pid)), lambda found: len(found) == 2)

        def building(pid: int) -> bool:  # importing the app's modules: asyncpg's is one the main process never loads
            return "asyncpg" in Path(f"/proc/{pid}/maps").read_text()

        poll(lambda: [building(pid) for pid in workers], all)
        proc.send_signal(signal.SIGTERM)  # before a worker's event loop handles signals of its own
        # Each worker keeps the stop, starts, and stops: the server ends (it used to wait for ever on a worker that had
        # lost the signal to the handler it inherited from the main process).
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_two_workers_serve_one_database_and_exactly_one_leads(tmp_path: Path, redis_server: RedisServer) -> None:
    state = tmp_path / "state"
    env = _on_redis(redis_server)
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


def _journaled(state: Path) -> dict[int, int]:
    """The bytes of answered calls not yet written, by worker (each journals under its pid, before it answers)."""
    sizes: dict[int, int] = {}
    for segment in (state / "journal").glob("*.seg"):
        pid = int(segment.name.split("-", 1)[0])
        sizes[pid] = sizes.get(pid, 0) + segment.stat().st_size
    return sizes


def _workers(state: Path) -> tuple[int, list[int]]:
    """granian's main process, and its two workers."""
    lock = state / "orchestrator.db.leader"
    granian = int(_status(int(poll(lock.read_text, lambda text: text.strip() != "").rsplit(":", 1)[1]))["PPid"])
    return granian, poll(lambda: sorted(_children(granian)), lambda found: len(found) == 2)


def _chat(base: str, key: str) -> int:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with httpx.Client() as fresh:  # a new connection each time: granian spreads them over the workers
        r = fresh.post(f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    return r.status_code


def _until_both_answer(state: Path, workers: list[int], call: Callable[[], int]) -> list[int]:
    """Calls until every worker has answered one (its journal grew); each must succeed. Answers their statuses."""
    before, statuses = _journaled(state), []
    while any(_journaled(state).get(pid, 0) <= before.get(pid, 0) for pid in workers):
        statuses.append(call())
        assert statuses[-1] == 200, statuses
        assert len(statuses) < 200, "the calls never reached both workers"
    return statuses


def test_a_key_issued_through_one_worker_is_taken_by_the_other_at_once(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    state = tmp_path / "state"
    env = _on_redis(redis_server, METERED) | {
        "ORCH_CATALOG_REFRESH_INTERVAL_S": "3600",  # no periodic net: what a worker knows, it read at start or was told
        "ORCH_USAGE_FLUSH_INTERVAL_S": "3600",  # answered calls stay in the journal of the worker that answered
    }
    with engine_process(MODEL) as (engine, _), serving(state, "--workers", "2", env=env) as (base, _):
        # The model, its replica made READY by the leader's probes, a key and its binding.
        _, first = metered_key(base, engine.chat_url)
        _, workers = _workers(state)
        poll(lambda: _chat(base, first), lambda status: status == 200)
        _until_both_answer(state, workers, lambda: _chat(base, first))  # both workers started, and know it
        [model] = httpx.get(f"{base}/api/v1/models", headers=ADMIN_HEADERS).json()
        # A second key, issued through one of them: the other is told at once, an hour before its refresh.
        _, second = bound_key(base, model["id"], name="second")
        poll(lambda: _chat(base, second), lambda status: status == 200)  # the announcement takes milliseconds
        _until_both_answer(state, workers, lambda: _chat(base, second))


def test_a_worker_killed_outright_comes_back_and_its_answered_calls_are_charged_once(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    state = tmp_path / "state"
    env = _on_redis(redis_server, METERED) | {
        "ORCH_USAGE_FLUSH_INTERVAL_S": "3600",  # the records job never writes: answered calls wait in the journal
    }
    with engine_process(MODEL) as (engine, _), serving(state, "--workers", "2", env=env) as (base, _):
        key_id, key = metered_key(base, engine.chat_url)
        granian, workers = _workers(state)
        answered = 0

        def call() -> int:
            nonlocal answered
            status = _chat(base, key)
            answered += status == 200
            return status

        # Each worker learns of the key's binding from the change feed: until then, it refuses the model.
        poll(call, lambda status: status == 200)
        _until_both_answer(state, workers, call)  # each worker holds answered calls not yet written
        victim = workers[0]
        os.kill(victim, signal.SIGKILL)

        back = poll(lambda: sorted(_children(granian)), lambda found: len(found) == 2 and victim not in found)
        assert back[0] != victim
        poll(lambda: _journaled(state), lambda owners: victim not in owners)  # replayed by the worker that replaced it
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
