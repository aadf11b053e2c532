"""`orchestrator serve --workers N`: N granian workers of the same app on one database, exactly one of them leading
the fleet's jobs; refused without Redis, where each worker would keep limits of its own."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx

from tests.support.redis import RedisServer
from tests.support.server import ORCHESTRATOR, orch_env, poll, serving

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
