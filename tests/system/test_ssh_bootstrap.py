"""Provisioning against real sshd sandboxes: pinned host keys, connect retries, and the idempotent engine bootstrap."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import pytest

from provisioning.bootstrap import EnginePlan, StepReport, bootstrap, plan_steps, restart_engine, stop_engine
from provisioning.plan import engine_commands, env_file, run_script
from provisioning.ssh import (
    AUTH_ATTEMPTS,
    CommandFailed,
    CommandResult,
    HostKeyMismatch,
    SshSession,
    SshUnreachable,
    connect,
    generate_keypair,
)
from provisioning.ssh_keys import parse_public_key
from tests.support.sshd import Sshd, next_address, wait_gone

SECRET = "sk-sandbox-'odd' $HOME secret"
# The engine stand-in: lives until signalled; the odd arguments check the shell quoting end to end.
ENGINE_SCRIPT = "import signal; signal.pause()"
ODD_ARGS = ("it's", "$HOME", "a  b", "`id`", "")


@pytest.fixture
def sshd_factory() -> Iterator[Callable[..., Sshd]]:
    """Makes sandbox VMs (started unless told not to); each is stopped, its engines killed, its dir removed."""
    made: list[Sshd] = []

    def make(*, start: bool = True) -> Sshd:
        sshd = Sshd()
        made.append(sshd)
        if start:
            sshd.start()
        return sshd

    yield make
    for sshd in made:
        sshd.close()


@pytest.fixture
def sshd(sshd_factory: Callable[..., Sshd]) -> Sshd:
    return sshd_factory()


@pytest.fixture
def session(sshd: Sshd) -> Iterator[SshSession]:
    with connect(sshd.target(), deadline_s=10) as s:
        yield s


def engine_plan(sshd: Sshd, **overrides: object) -> EnginePlan:
    work_dir = str(sshd.work_dir)
    fields: dict[str, object] = {
        "serve_argv": (sys.executable, "-c", ENGINE_SCRIPT, *ODD_ARGS),
        "secret_env": {"VLLM_API_KEY": SECRET},
        "work_dir": work_dir,
        "service": "pidfile",
        "gpu_check": None,
        "install_check": f"test -f {work_dir}/installed",
        "install": f"echo installing; touch {work_dir}/installed",
    }
    return EnginePlan(**(fields | overrides))  # type: ignore[arg-type]


def engine_pid(sshd: Sshd) -> int:
    return int((sshd.work_dir / "engine.pid").read_text())


class Recording:
    """A session that records what bootstrap asks of it, then does it."""

    def __init__(self, inner: SshSession) -> None:
        self.inner = inner
        self.commands: list[str] = []
        self.writes: list[str] = []

    def run(self, command: str, *, timeout_s: float = 60.0, stdin: bytes | None = None) -> CommandResult:
        self.commands.append(command)
        return self.inner.run(command, timeout_s=timeout_s, stdin=stdin)

    def write_file(self, path: str, content: bytes, mode: int = 0o600) -> None:
        self.writes.append(path)
        self.inner.write_file(path, content, mode)


def test_connect_pins_the_host_key_and_binds_the_source_address(sshd: Sshd) -> None:
    source = next_address()
    with connect(sshd.target(source_address=source), deadline_s=10) as s:
        peer = s.run("echo $SSH_CLIENT").output.split()
        assert peer == [source, peer[1], str(sshd.port)]
        result = s.run("cat; echo err >&2; exit 7", stdin=b"from stdin\n")
        assert result == CommandResult(7, "from stdin\nerr\n")


def test_wrong_host_key_is_refused_without_retrying(sshd: Sshd) -> None:
    _, other_key = generate_keypair()
    before = sshd.connections()
    started = time.monotonic()
    with pytest.raises(HostKeyMismatch) as caught:
        connect(sshd.target(host_key=other_key), deadline_s=30)
    assert time.monotonic() - started < 5
    assert parse_public_key(sshd.host_key).fingerprint in str(caught.value)
    assert sshd.connections() == before + 1  # one attempt, not a retry loop until the deadline


def test_a_refused_client_key_is_tried_a_few_times_then_believed(sshd: Sshd) -> None:
    stranger, _ = generate_keypair()
    before = sshd.connections()
    started = time.monotonic()
    with pytest.raises(SshUnreachable, match="refused the client key"):
        connect(sshd.target(client_key=stranger), deadline_s=30)
    assert time.monotonic() - started < 5  # not a retry loop until the deadline
    # A busy sshd that drops the connection mid-authentication looks the same to paramiko: a few more tries.
    assert sshd.connections() == before + AUTH_ATTEMPTS


def test_connect_retries_until_a_late_sshd_accepts(sshd_factory: Callable[..., Sshd]) -> None:
    sshd = sshd_factory(start=False)
    # Something that accepts and hangs up proves connect began before sshd: its first attempt gets no banner.
    listener = socket.create_server((sshd.address, sshd.port))
    listener.settimeout(10)

    def start_late() -> None:
        with listener:
            conn, _ = listener.accept()
            conn.close()
        sshd.start()

    with ThreadPoolExecutor(1) as pool:
        late = pool.submit(start_late)
        started = time.monotonic()
        with connect(sshd.target(), deadline_s=20, attempt_timeout_s=5) as s:
            assert time.monotonic() - started < 10
            assert s.run("echo ok").output == "ok\n"
        late.result()


def test_unreachable_after_the_deadline(sshd_factory: Callable[..., Sshd]) -> None:
    sshd = sshd_factory(start=False)  # keys and an address, but nothing listens
    started = time.monotonic()
    with pytest.raises(SshUnreachable, match="unreachable after") as caught:
        connect(sshd.target(), deadline_s=1.0, attempt_timeout_s=0.5)
    assert 0.5 < time.monotonic() - started < 4
    assert "ConnectionRefusedError" in str(caught.value)


def test_run_times_out(sshd: Sshd, session: SshSession) -> None:
    pid_file = sshd.work_dir / "sleeper.pid"
    sshd.work_dir.mkdir()
    started = time.monotonic()
    with pytest.raises(CommandFailed) as caught:
        session.run(f"echo started; echo $$ > {pid_file}; exec sleep 60", timeout_s=0.5)
    assert time.monotonic() - started < 3
    assert (caught.value.exit_status, caught.value.output) == (None, "started\n")
    assert "timed out" in str(caught.value)
    # The fixture's teardown kills it through the pid file.


def test_write_file_replaces_content_and_sets_the_mode(sshd: Sshd, session: SshSession) -> None:
    path = sshd.dir / "written"
    session.write_file(str(path), b"first")
    session.write_file(str(path), b"second\x00bytes", mode=0o640)
    assert path.read_bytes() == b"second\x00bytes"
    assert path.stat().st_mode & 0o777 == 0o640
    assert not Path(f"{path}.tmp").exists()


def test_bootstrap_then_again_changes_nothing(sshd: Sshd, session: SshSession) -> None:
    plan = engine_plan(sshd)
    seen: list[StepReport] = []
    first = bootstrap(session, plan, on_step=seen.append)
    assert [(r.name, r.changed) for r in first] == [
        ("work_dir", True),
        ("install", True),
        ("env_file", True),
        ("service_file", True),
        ("start", True),
        ("verify", False),
    ]
    assert seen == first
    assert "installing" in first[1].output
    pid = engine_pid(sshd)
    proc = Path(f"/proc/{pid}")
    assert (proc / "cmdline").read_bytes().split(b"\0")[:-1] == [a.encode() for a in plan.serve_argv]
    assert f"VLLM_API_KEY={SECRET}".encode() in (proc / "environ").read_bytes().split(b"\0")
    assert all(SECRET not in repr(r) for r in first)
    env = sshd.work_dir / "engine.env"
    assert (env.read_bytes(), env.stat().st_mode & 0o777) == (env_file(plan.secret_env), 0o600)
    assert (sshd.work_dir / "run.sh").read_bytes() == run_script(plan)
    mtimes = {p.name: p.stat().st_mtime_ns for p in sshd.work_dir.iterdir()}

    # Again, from a new session: the engine outlived the first one, and nothing is applied.
    session.close()
    with connect(sshd.target(), deadline_s=10) as again:
        recording = Recording(again)
        second = bootstrap(cast(SshSession, recording), plan)
    assert [r.changed for r in second] == [False] * len(first)
    assert recording.commands == [step.check for step in plan_steps(plan)]
    assert recording.writes == []
    assert engine_pid(sshd) == pid
    assert {p.name: p.stat().st_mtime_ns for p in sshd.work_dir.iterdir()} == mtimes


def test_a_new_secret_restarts_the_running_engine(sshd: Sshd, session: SshSession) -> None:
    bootstrap(session, engine_plan(sshd))
    old_pid = engine_pid(sshd)
    reports = bootstrap(session, engine_plan(sshd, secret_env={"VLLM_API_KEY": "sk-rotated"}))
    assert {r.name for r in reports if r.changed} == {"env_file", "start"}
    new_pid = engine_pid(sshd)
    assert new_pid != old_pid
    wait_gone(old_pid)
    assert b"VLLM_API_KEY=sk-rotated" in Path(f"/proc/{new_pid}/environ").read_bytes().split(b"\0")


def test_a_file_written_by_a_bootstrap_that_died_before_restarting_still_restarts(
    sshd: Sshd, session: SshSession
) -> None:
    bootstrap(session, engine_plan(sshd))
    old_pid = engine_pid(sshd)
    rotated = engine_plan(sshd, secret_env={"VLLM_API_KEY": "sk-rotated"})
    # The previous run wrote the new env file, then died before its start step.
    session.write_file(f"{sshd.work_dir}/engine.env", env_file(rotated.secret_env))
    reports = bootstrap(session, rotated)
    assert [r.name for r in reports if r.changed] == ["start"]
    new_pid = engine_pid(sshd)
    assert new_pid != old_pid
    assert b"VLLM_API_KEY=sk-rotated" in Path(f"/proc/{new_pid}/environ").read_bytes().split(b"\0")


def test_restart_then_stop(sshd: Sshd, session: SshSession) -> None:
    plan = engine_plan(sshd)
    bootstrap(session, plan)
    old_pid = engine_pid(sshd)
    restarted = restart_engine(session, plan)
    assert (restarted.name, restarted.changed) == ("restart", True)
    new_pid = engine_pid(sshd)
    assert new_pid != old_pid
    wait_gone(old_pid)
    assert Path(f"/proc/{new_pid}").exists()

    assert stop_engine(session, plan) == StepReport("stop", changed=True, output="")
    wait_gone(new_pid)
    assert not (sshd.work_dir / "engine.pid").exists()
    assert stop_engine(session, plan).changed is False


def test_failing_gpu_check_stops_the_bootstrap(sshd: Sshd, session: SshSession) -> None:
    plan = engine_plan(sshd, gpu_check="echo 'no GPU here' >&2; exit 3")
    with pytest.raises(CommandFailed) as caught:
        bootstrap(session, plan)
    assert (caught.value.command_name, caught.value.exit_status) == ("gpu", 3)
    assert caught.value.output == "no GPU here\n"
    assert "no GPU here" in str(caught.value)
    assert not sshd.work_dir.exists()  # nothing after the failed step ran


def test_failing_install_and_install_that_does_not_take(sshd: Sshd, session: SshSession) -> None:
    with pytest.raises(CommandFailed) as caught:
        bootstrap(session, engine_plan(sshd, install="echo boom; exit 1"))
    assert (caught.value.command_name, caught.value.exit_status, caught.value.output) == ("install", 1, "boom\n")
    with pytest.raises(CommandFailed, match=r"install \(check after apply\)"):
        bootstrap(session, engine_plan(sshd, install="true"))


def test_secrets_are_redacted_from_failures(sshd: Sshd, session: SshSession) -> None:
    bootstrap(session, engine_plan(sshd))
    leaky = engine_plan(sshd, gpu_check=f"cat {sshd.work_dir}/engine.env; exit 5")
    with pytest.raises(CommandFailed) as caught:
        bootstrap(session, leaky)
    assert "VLLM_API_KEY=<redacted>" in caught.value.output
    assert SECRET not in caught.value.output
    assert SECRET not in str(caught.value)
    assert "sk-sandbox" not in "".join(str(a) for a in caught.value.args)


def test_pidfile_commands_work_under_dash(sshd_factory: Callable[..., Sshd]) -> None:
    """The VM's login shell may be dash (Debian's /bin/sh), not bash as for root here."""
    sshd = sshd_factory(start=False)  # only for its work dir, which its teardown cleans
    plan = engine_plan(sshd)
    commands = engine_commands(plan)
    sshd.work_dir.mkdir(mode=0o700)
    (sshd.work_dir / "engine.env").write_bytes(env_file(plan.secret_env))
    (sshd.work_dir / "run.sh").write_bytes(run_script(plan))

    def sh(command: str) -> int:
        return subprocess.run(["/bin/sh", "-c", command], check=False, timeout=60).returncode

    assert sh(commands.running) != 0
    assert sh(commands.restart) == 0
    pid = engine_pid(sshd)
    assert sh(commands.running) == 0
    assert sh(commands.current) == 0
    os.utime(sshd.work_dir / "engine.env")  # as if rewritten after the engine started
    assert sh(commands.current) != 0
    assert (Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]) == [a.encode() for a in plan.serve_argv]
    assert os.getpgid(pid) == pid  # it leads its own group, which stop signals
    assert sh(commands.stop) == 0
    wait_gone(pid)
    assert sh(commands.running) != 0
