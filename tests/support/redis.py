"""A private Redis for the test session: Debian's `redis-server`, started here on a Unix socket in a directory of
its own, with nothing written to disk, and thrown away after.

Nothing is skipped when Redis is missing: the session fails and says how to install it.
`ORCH_TEST_REDIS_URL` points the tests at an existing server instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis

START_TIMEOUT_S = 30.0


@dataclass
class RedisServer:
    url: str
    """redis:// or unix:// URL of database 0."""
    _dir: Path | None = None
    _proc: subprocess.Popen[bytes] | None = None
    command: list[str] = field(default_factory=list)

    @classmethod
    @contextmanager
    def serving(cls) -> Iterator[RedisServer]:
        if url := os.environ.get("ORCH_TEST_REDIS_URL"):
            yield cls(url)
            return
        server = cls.private()
        try:
            yield server
        finally:
            server.stop()

    @classmethod
    def private(cls) -> RedisServer:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            raise RuntimeError("redis-server not found: run scripts/test, which installs Debian's redis-server")
        base = Path(tempfile.mkdtemp(prefix="orch-redis-"))  # short: socket paths are limited to ~107 bytes
        socket = base / "redis.sock"
        command = [binary, "--port", "0", "--unixsocket", str(socket), "--unixsocketperm", "700"]
        command += ["--dir", str(base), "--save", "", "--appendonly", "no", "--daemonize", "no"]
        server = cls(f"unix://{socket}", base, command=command)
        server.resume()
        return server

    def resume(self) -> None:
        """Start the (private) server, empty, and wait until it answers."""
        assert self._dir is not None, "an existing server (ORCH_TEST_REDIS_URL) is not ours to start"
        with (self._dir / "log").open("ab") as log:
            self._proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def pause(self) -> None:
        """Stop the (private) server: an outage. Nothing is saved, so `resume` starts an empty one."""
        assert self._proc is not None, "an existing server (ORCH_TEST_REDIS_URL) is not ours to stop"
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """The (private) server stopped with SIGSTOP: its connections stay open, and nothing answers on them (a peer
        gone silently); it goes on where it stopped afterwards."""
        assert self._proc is not None, "an existing server (ORCH_TEST_REDIS_URL) is not ours to freeze"
        self._proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self._proc.send_signal(signal.SIGCONT)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self._proc is None or self._proc.poll() is None, "redis-server exited at start (see its log)"
            try:
                with redis.Redis.from_url(self.url) as client:
                    client.ping()
                return
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not come up"
                time.sleep(0.02)

    def stop(self) -> None:
        if self._proc is not None:
            self.pause()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    @staticmethod
    def new_namespace() -> str:
        """A deployment name of a test's own (`ORCH_DEPLOYMENT`, which names the keys of its limits), so that tests
        sharing the server never see each other's counters."""
        return f"t{uuid.uuid4().hex[:12]}"
