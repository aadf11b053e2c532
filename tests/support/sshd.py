"""Real OpenSSH sshd processes as sandbox VMs: each on its own 127.0.9.x address with its own keys and work dir."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from infra.sandbox import sshd_argv
from provisioning.ssh import SshTarget, generate_keypair

SSHD = "/usr/sbin/sshd"
USER = "root"  # the tests run as root, and a non-root sshd only logs in as its own user anyway
_hosts = itertools.count(10)


def next_address() -> str:
    """A loopback address no other sandbox of this session uses (127.0.9.10 onwards)."""
    return f"127.0.9.{next(_hosts) % 240 + 10}"


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def wait_gone(pid: int, deadline_s: float = 10.0) -> None:
    """Polls until `pid` has exited (a zombie counts: init reaps orphans late)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(") ")[2][:1]
        except (FileNotFoundError, ProcessLookupError):  # gone before the open, or between the open and the read
            return
        if state == "Z":
            return
        assert time.monotonic() < deadline, f"process {pid} still running"
        time.sleep(0.01)


class Sshd:
    """One sandbox VM: an sshd that logs `root` in with `client_key`, and `work_dir` for what runs there."""

    def __init__(self, address: str | None = None, port: int | None = None) -> None:
        self.address = address or next_address()
        self.port = port or free_port(self.address)
        self.dir = Path(tempfile.mkdtemp(prefix="sshd-"))
        self.work_dir = self.dir / "vm"
        self.host_key_private, self.host_key = generate_keypair("sandbox-host")
        self.client_key, client_public = generate_keypair("orchestrator")
        host_key_file = self.dir / "host_ed25519"
        host_key_file.write_text(self.host_key_private)
        host_key_file.chmod(0o600)  # sshd ignores a host key others can read
        (self.dir / "authorized_keys").write_text(client_public + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def target(self, **overrides: object) -> SshTarget:
        target = SshTarget(self.address, self.port, USER, self.host_key, self.client_key)
        return replace(target, **overrides)  # type: ignore[arg-type]

    def connections(self) -> int:
        """How many TCP connections sshd has accepted so far (its readiness probe included)."""
        return self.log.count("Connection from ")

    @property
    def log(self) -> str:
        path = self.dir / "sshd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, deadline_s: float = 10.0) -> None:
        assert Path("/run/sshd").is_dir(), "sshd needs /run/sshd (scripts/test creates it)"
        d = self.dir
        # LogLevel VERBOSE logs "Connection from" for each connection, so tests can count attempts.
        argv = sshd_argv(SSHD, self.address, self.port, d, LogLevel="VERBOSE")
        with (d / "sshd.log").open("ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self._wait_ready(deadline_s)

    def _wait_ready(self, deadline_s: float) -> None:
        deadline = time.monotonic() + deadline_s
        assert self.proc is not None
        while True:
            assert self.proc.poll() is None, f"sshd exited with {self.proc.returncode}:\n{self.log}"
            try:
                with socket.create_connection((self.address, self.port), timeout=1) as s:
                    if s.recv(4) == b"SSH-":
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, f"sshd did not accept connections:\n{self.log}"
            time.sleep(0.005)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def kill_engines(self) -> None:
        """Kills the process group of every pid file in the work dir (what a bootstrap left running)."""
        for pid_file in self.work_dir.glob("*.pid"):
            text = pid_file.read_text().strip()
            if not text.isdigit():
                continue
            pid = int(text)
            try:
                os.killpg(pid, signal.SIGKILL)  # engines lead their own group, and may have children
            except ProcessLookupError:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
            wait_gone(pid)

    def close(self) -> None:
        try:
            self.kill_engines()
        finally:
            self.stop()
            shutil.rmtree(self.dir, ignore_errors=True)
