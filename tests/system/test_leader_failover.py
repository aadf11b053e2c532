"""One leader for the fleet's jobs across processes: two `orchestrator serve` (one of them `--no-scheduler`) and an
`orchestrator worker` on one PostgreSQL; the leader is SIGKILLed in the middle of a managed replica's bootstrap,
the worker takes the lead over, and the replica reaches READY on the same (and only) sandbox VM."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from infra.sandbox import SandboxBackend, SandboxConfig
from tests.support.aio import run_in_thread
from tests.support.postgres import PostgresServer
from tests.support.sandbox import listening_on, next_subnet
from tests.support.server import ORCHESTRATOR, START_TIMEOUT_S, orch_env, poll, serving
from tests.support.toolkit import vm_details
from tests.system.test_crash_resume import BLOCK_TABLE, block_ssh, replica

pytestmark = pytest.mark.postgres

ADMIN = "sk-crash-test-admin-key-0123456789"
"""The admin key `replica` (from the crash test) reads with."""
SECRET = "leader-failover-secret-key-0123456789"
WALK = ["PENDING", "PROVISIONING", "BOOTSTRAPPING", "STARTING", "SECURING", "READY"]
TAKE_OVER_S = 10.0
"""A contender tries the lease every second: the worker must lead within a few of them."""


@pytest.fixture
def subnet() -> str:
    return next_subnet()


@pytest.fixture
def sandbox(tmp_path: Path, subnet: str) -> Iterator[SandboxBackend]:
    """The sandbox every process uses (one state directory, as processes on one machine share it)."""
    assert os.geteuid() == 0, "this test needs root for nftables (CI runs as root)"
    backend = SandboxBackend(SandboxConfig(root=tmp_path / "state" / "sandbox", subnet=subnet))
    try:
        yield backend
    finally:
        subprocess.run(
            ["nft", "-f", "-"],
            input=f"add table inet {BLOCK_TABLE}\ndelete table inet {BLOCK_TABLE}\n",
            text=True,
            check=True,
        )
        for replica_id in backend.owned():
            backend.destroy(replica_id)


@pytest.fixture
def database(postgres: PostgresServer) -> str:
    return run_in_thread(postgres.new_database)


def leader_pid(database: str) -> int | None:
    """The process whose lock connection holds the lead, from the name it gives that connection."""

    async def look() -> int | None:
        conn = await asyncpg.connect(make_url(database).set(drivername="postgresql").render_as_string(False))
        try:
            names = await conn.fetch(
                "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.locktype = 'advisory' AND l.granted AND a.application_name LIKE 'orchestrator-leader %'"
            )
        finally:
            await conn.close()
        assert len(names) <= 1, names
        return int(names[0]["application_name"].rsplit(":", 1)[1]) if names else None

    return run_in_thread(look)


@contextmanager
def working(tmp_path: Path, env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """`orchestrator worker` on the same database and state directory; its output in a file."""
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*ORCHESTRATOR, "worker"],
            env=orch_env(tmp_path / "state") | env | {"ORCH_LOG_LEVEL": "INFO"},
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    try:
        # Up before the test goes on: a worker still importing (30 s on a busy machine) could not take over in time.
        poll(lambda: proc.poll() is None and '"orchestrator.started"' in log.read_text(), bool, START_TIMEOUT_S)
        yield proc, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def env_for(database: str, subnet: str) -> dict[str, str]:
    return {
        "ORCH_DATABASE_URL": database,
        "ORCH_ADMIN_API_KEY": ADMIN,
        "ORCH_SECRET_KEY": SECRET,
        "ORCH_SANDBOX_SUBNET": subnet,
        "ORCH_LOG_LEVEL": "WARNING",
    }


def test_the_worker_takes_the_lead_from_a_killed_leader_and_finishes_the_replica_on_its_one_vm(
    tmp_path: Path,
    database: str,
    subnet: str,
    sandbox: SandboxBackend,
) -> None:
    env = env_for(database, subnet)
    state = tmp_path / "state"
    address = str(ipaddress.ip_network(subnet)[1])  # replica 1's sandbox
    headers = {"Authorization": f"Bearer {ADMIN}"}
    block_ssh(address)  # the bootstrap keeps retrying to connect: the leader is killed in the middle of it
    with serving(state, env=env, stop_signal=signal.SIGKILL):
        leader = poll(lambda: leader_pid(database), lambda pid: pid is not None)  # the first to start leads
        assert leader is not None
        with serving(state, "--no-scheduler", env=env) as (api, _), working(tmp_path, env) as (worker, log):
            model = httpx.post(f"{api}/api/v1/models", json={"name": "sim-llama"}, headers=headers).json()
            r = httpx.post(
                f"{api}/api/v1/models/{model['id']}/replicas",
                json={"create_vm": True, "vm_creation_details": vm_details(security_rules=[])},
                headers=headers,
            )
            assert r.status_code == 201, r.text
            replica_id = r.json()["replica_id"]
            poll(replica(api, replica_id), lambda b: b["status"] == "BOOTSTRAPPING")
            sshd_pid = (sandbox.work_dir(replica_id).parent / "sshd.pid").read_text()
            assert leader_pid(database) == leader  # the worker only waits its turn

            os.killpg(os.getpgid(leader), signal.SIGKILL)  # the leader's whole server, as a crash would
            poll(lambda: leader_pid(database), lambda pid: pid == worker.pid, timeout_s=TAKE_OVER_S)
            subprocess.run(["nft", "-f", "-"], input=f"delete table inet {BLOCK_TABLE}\n", text=True, check=True)

            detail = poll(replica(api, replica_id), lambda b: b["status"] in {"READY", "TERMINATED"}, timeout_s=60)
            assert detail["status"] == "READY", detail["events"]
            assert [e["to_status"] for e in detail["events"] if e["from_status"] != e["to_status"]] == WALK
            assert (sandbox.work_dir(replica_id).parent / "sshd.pid").read_text() == sshd_pid  # the same VM
            assert sandbox.owned() == {replica_id}  # and no other
            assert sorted(listening_on(address)) == [f"{address}:2222", f"{address}:8000"]
            assert leader_pid(database) == worker.pid  # the server that only serves never led

            assert httpx.delete(f"{api}/api/v1/replicas/{replica_id}", headers=headers).status_code == 204
            poll(replica(api, replica_id), lambda b: b["status"] == "TERMINATED")
            assert sandbox.owned() == frozenset()

            worker.send_signal(signal.SIGTERM)  # stops cleanly, giving the lead back
            assert worker.wait(timeout=15) == 0
    said = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    me = f"{socket.gethostname()}:{worker.pid}"
    assert [(e["event"], e["instance"]) for e in said if e["event"].startswith("leader.")] == [
        ("leader.acquired", me),
        ("leader.released", me),
    ]
