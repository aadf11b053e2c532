"""The real `orchestrator` command: first start on an empty state dir, the admin key shown once, migrations."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ORCHESTRATOR = [sys.executable, "-m", "api.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(state_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env.update({"ORCH_STATE_DIR": str(state_dir), "ORCH_LOG_FORMAT": "json"})
    return env


@contextmanager
def serving(state_dir: Path, *extra: str) -> Iterator[tuple[str, list[str]]]:
    """Run `orchestrator serve`; after the block, the list holds everything it printed."""
    port = _free_port()
    output: list[str] = []
    proc = subprocess.Popen(
        [*ORCHESTRATOR, "serve", "--host", "127.0.0.1", "--port", str(port), *extra],
        env=_env(state_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, "server exited at start"
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.05)
        yield base, output
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        if proc.stdout:
            output.append(proc.stdout.read())
            proc.stdout.close()


def test_help_lists_the_commands() -> None:
    out = subprocess.run([*ORCHESTRATOR, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("serve", "db"):
        assert command in out
    out = subprocess.run([*ORCHESTRATOR, "serve", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--host", "--port", "--no-scheduler"):
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
        r = httpx.post(
            f"{base}/api/v1/models/1/replicas", json={"endpoint": "http://10.0.0.1:8000/v1"}, headers=headers
        )
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
        [*ORCHESTRATOR, "db", "upgrade"], env=_env(tmp_path), capture_output=True, text=True, check=True
    ).stdout
    assert "newest schema" in out
    assert (tmp_path / "orchestrator.db").exists()
