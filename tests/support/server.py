"""Run the real `orchestrator serve` in a subprocess on a free port."""

from __future__ import annotations

import os
import socket
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


def orch_env(state_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env.update({"ORCH_STATE_DIR": str(state_dir), "ORCH_LOG_FORMAT": "json"})
    return env


@contextmanager
def serving(state_dir: Path, *extra: str, env: dict[str, str] | None = None) -> Iterator[tuple[str, list[str]]]:
    """Run `orchestrator serve`; after the block, the list holds everything it printed."""
    port = _free_port()
    output: list[str] = []
    proc = subprocess.Popen(
        [*ORCHESTRATOR, "serve", "--host", "127.0.0.1", "--port", str(port), *extra],
        env=orch_env(state_dir) | (env or {}),
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
