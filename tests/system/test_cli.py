"""The real `orchestrator` command: first start on an empty state dir, the admin key shown once, migrations."""

from __future__ import annotations

import stat
import subprocess
import time
from pathlib import Path

import httpx

from tests.support.server import ORCHESTRATOR, orch_env, serving


def test_help_lists_the_commands() -> None:
    out = subprocess.run([*ORCHESTRATOR, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("serve", "worker", "db"):
        assert command in out
    out = subprocess.run([*ORCHESTRATOR, "serve", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--host", "--port", "--no-scheduler", "--workers"):
        assert flag in out


def test_first_start_generates_and_shows_the_admin_key_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with serving(state) as (base, output):
        key = (state / "admin_api_key").read_text().strip()
        assert stat.S_IMODE((state / "admin_api_key").stat().st_mode) == 0o600
        assert stat.S_IMODE((state / "secret_key").stat().st_mode) == 0o600
        assert (state / "orchestrator.db").exists()
        headers = {"Authorization": f"Bearer {key}"}
        assert httpx.post(f"{base}/api/v1/models", json={"name": "llama"}, headers=headers).status_code == 201
        # The in-process scheduler takes a new external replica to STARTING by itself.
        r = httpx.post(f"{base}/api/v1/models/1/replicas", json={"endpoint": "http://127.0.0.1:91/v1"}, headers=headers)
        replica_id = r.json()["replica_id"]
        deadline = time.monotonic() + 10
        while httpx.get(f"{base}/api/v1/replicas/{replica_id}", headers=headers).json()["status"] != "STARTING":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.get(f"{base}/schema/openapi.json").status_code == 200
    [first_output] = output
    assert first_output.count(key) == 1
    assert "shown this once" in first_output
    assert str(state / "admin_api_key") in first_output

    with serving(state, "--no-scheduler") as (base, output):
        assert httpx.get(f"{base}/api/v1/models", headers={"Authorization": f"Bearer {key}"}).json() == [
            {"id": 1, "name": "llama"}
        ]
    [second_output] = output
    assert key not in second_output
    assert str(state / "admin_api_key") in second_output


def test_db_upgrade_creates_the_schema(tmp_path: Path) -> None:
    out = subprocess.run(
        [*ORCHESTRATOR, "db", "upgrade"], env=orch_env(tmp_path), capture_output=True, text=True, check=True
    ).stdout
    assert "newest schema" in out
    assert (tmp_path / "orchestrator.db").exists()
