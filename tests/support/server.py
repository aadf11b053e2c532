"""Run the real `orchestrator serve` in a subprocess on a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import httpx

ORCHESTRATOR = [sys.executable, "-m", "api.cli"]


T = TypeVar("T")


def poll(get: Callable[[], T], until: Callable[[T], bool], timeout_s: float = 30.0) -> T:
    """`get()` again until `until` holds of its answer, which is returned; past the deadline, fail with the last one."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = get()
        if until(answer):
            return answer
        assert time.monotonic() < deadline, f"gave up waiting; last: {answer}"
        time.sleep(0.05)


START_TIMEOUT_S = 90.0
"""A server starts in about 2 s here; a CI machine busy with booting VMs has taken over 30."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def orch_env(state_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env.update({"ORCH_STATE_DIR": str(state_dir), "ORCH_LOG_FORMAT": "json"})
    return env


@contextmanager
def serving(
    state_dir: Path, *extra: str, env: dict[str, str] | None = None, stop_signal: int = signal.SIGTERM
) -> Iterator[tuple[str, list[str]]]:
    """Run `orchestrator serve`; after the block, the list holds everything it printed.
    `stop_signal=SIGKILL` ends it as a crash would."""
    port = free_port()
    output: list[str] = []
    proc = subprocess.Popen(
        [*ORCHESTRATOR, "serve", "--host", "127.0.0.1", "--port", str(port), *extra],
        env=orch_env(state_dir) | (env or {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a crash takes the server's workers down too
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
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
        if stop_signal == signal.SIGKILL:
            os.killpg(proc.pid, signal.SIGKILL)  # every process of the server at once, as a crash would
        else:
            proc.send_signal(stop_signal)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:  # a server that does not stop fails its test, and is not left running
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        if proc.stdout:
            output.append(proc.stdout.read())
            proc.stdout.close()
