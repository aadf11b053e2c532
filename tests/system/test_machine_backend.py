"""Managed replicas on `machine` VMs: booted Debian machines (debootstrap image, systemd-nspawn, cloud-init NoCloud
with the user-data a GPU cloud gets), reached over a veth, firewalled by nftables outside the machine, and
bootstrapped as the `ubuntu` login through `sudo -n`.

Real: the boot, systemd, sshd, sudo, cloud-init, the units, env files, restarts and the firewall. Stand-ins (the
machine has no GPU, Docker engine or registry): `nvidia-smi`, and a `docker` that runs the engine simulator for the
vLLM image (`infra/machine/standins/`). The image is built once (about a minute) and cached across runs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from infra.cloud_init import user_data
from infra.machine import ImageRecipe, MachineBackend
from infra.machine.image import ensure_image
from infra.vm import VmHandle, VmRequest
from orchestrator.domain.lifecycle import ReplicaStatus
from orchestrator.fleet.reconcile import reconcile
from orchestrator.platform.settings import Settings
from orchestrator.runtime.compose import machine_backend
from orchestrator.runtime.container import Deps
from orchestrator.store.tables import Replica
from provisioning.ssh_keys import generate_keypair
from tests.support.gateway import issue_key, openai_client
from tests.support.managed_sandbox import managed_backend
from tests.support.sandbox import connects
from tests.support.server import poll, serving
from tests.support.settings import instance_settings
from tests.support.toolkit import create_model, vm_details
from tests.support.vm import WrappedBackend, vm_request

S = ReplicaStatus
MODEL = "sim-llama"
GATEWAY, ORCHESTRATOR, STRANGER = "10.212.0.1", "10.212.0.2", "10.212.0.3"
DOCKER_RUN = (
    "docker run --rm --name vllm --runtime nvidia --gpus all --ipc=host -p 8000:8000 "
    f"vllm/vllm-openai:v0.11.0 --model {MODEL} --port 8000 --max-model-len 4096"
)
ADMIN = "sk-machine-crash-admin-key-0123456789"
BLOCK_TABLE = "orch_test_block_machine_ssh"
WALK = ["PENDING", "PROVISIONING", "BOOTSTRAPPING", "STARTING", "SECURING", "READY"]


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'orchestrator.db'}"  # one database kind: the machines are the subject


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    assert os.geteuid() == 0, "machine VMs need root (mounts, namespaces, nftables); CI runs as root"
    base = instance_settings(tmp_path / "state", database_url)
    return base.model_copy(update={"infra_backend": "machine", "machine_subnet": "10.213.0.0/24"})


@pytest.fixture
async def machines(deps: Deps) -> AsyncIterator[MachineBackend]:
    async with managed_backend(deps, MachineBackend) as backend:
        yield backend


async def drive_to(deps: Deps, replica_id: int, status: ReplicaStatus, timeout_s: float = 180.0) -> Replica:
    deadline = time.monotonic() + timeout_s
    while True:
        await reconcile(deps.store, deps.managed)
        await deps.managed.settle()
        await deps.health.run()
        replica = await deps.store.replica(replica_id)
        assert replica is not None
        if replica.status == status:
            return replica
        if replica.status in {S.TERMINATING, S.TERMINATED} and status not in {S.TERMINATING, S.TERMINATED}:
            detail = await deps.replicas.detail(replica_id)
            pytest.fail(f"ended {replica.termination_reason}: {[(e.reason, e.message) for e in detail.events][-4:]}")
        assert time.monotonic() < deadline, f"still {replica.status} after {timeout_s} s"
        await asyncio.sleep(0.1)  # the machine and its engine run in their own processes


def engine_pids(machines: MachineBackend, replica_id: int) -> list[int]:
    found = []
    for pid in machines.processes(replica_id):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"orchestrator.enginesim" in cmdline:
            found.append(pid)
    return found


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def machine_file(deps: Deps, replica_id: int, path: str) -> str:
    """A file the machine wrote, read from its overlay's upper layer on this host."""
    return (deps.settings.state_dir / "machine" / f"replica-{replica_id}" / "upper" / path).read_text()


def proc_strings(pid: int, name: str) -> list[bytes]:
    """A process's NUL-separated /proc file (`cmdline`, `environ`)."""
    return Path(f"/proc/{pid}/{name}").read_bytes().split(b"\0")


async def until(what: str, check: object, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        await asyncio.sleep(0.1)


async def chat(transport: httpx.ASGITransport, key: str) -> str:
    answer = await openai_client(transport, key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    return answer.choices[0].message.content or ""


async def test_a_docker_run_replica_boots_serves_survives_kill_and_reboot_and_leaves_nothing(
    deps: Deps, client: httpx.AsyncClient, transport: httpx.ASGITransport, machines: MachineBackend
) -> None:
    keypairs = deps.settings.state_dir / "keypairs"  # the machine backend's stand-in for the cloud's keypairs
    admin_key = generate_keypair("admin@laptop")[1]
    write_text(keypairs / "ops.pub", admin_key)
    model_id = await create_model(client, MODEL)
    details = vm_details(run_command=DOCKER_RUN, security_rules=[], key_name="ops")
    r = await client.post(
        f"/api/v1/models/{model_id}/replicas", json={"create_vm": True, "vm_creation_details": details}
    )
    assert r.status_code == 201, r.text
    replica_id = int(r.json()["replica_id"])

    replica = await drive_to(deps, replica_id, S.READY)
    # One `ubuntu` login, opened by the orchestrator's key and by the admin's keypair (as a cloud installs it).
    authorized = machine_file(deps, replica_id, "home/ubuntu/.ssh/authorized_keys").splitlines()
    assert admin_key in authorized
    assert deps.managed.access.client_public_key(replica) in authorized

    address, port = replica.vm_address or "", replica.port or 0
    assert (address, replica.ssh_user) == (machines.address(replica_id), "ubuntu")
    detail = (await client.get(f"/api/v1/replicas/{replica_id}")).json()
    assert [e["to_status"] for e in detail["events"] if e["from_status"] != e["to_status"]] == WALK
    reasons = {e["reason"] for e in detail["events"]}
    assert {"bootstrap_sudo", "bootstrap_gpu", "bootstrap_runtime", "bootstrap_unit_installed"} <= reasons
    [secured] = [e["message"] for e in detail["events"] if e["reason"] == "secured"]
    assert f"verified from the gateway, the orchestrator and a foreign source ({STRANGER})" in secured

    _, key = await issue_key(client)
    assert await chat(transport, key)
    assert connects(address, port, GATEWAY)
    assert not connects(address, port, STRANGER)
    assert not connects(address, 22, STRANGER)
    assert not connects(address, 22, ORCHESTRATOR)  # SSH closed once it serves

    # The engine runs as the unit's process inside the machine; killed, systemd starts it again.
    [engine] = engine_pids(machines, replica_id)
    os.kill(engine, signal.SIGKILL)
    await until("systemd restarted the engine", lambda: [p for p in engine_pids(machines, replica_id) if p != engine])
    await until("the engine answers again", lambda: connects(address, port, GATEWAY))
    assert await chat(transport, key)

    # Rebooted from inside, the machine boots again (its supervisor) and the enabled unit starts the engine.
    init = machines.init_pid(replica_id)
    machines.reboot(replica_id)
    await until("the machine rebooted", lambda: machines.init_pid(replica_id) not in {None, init}, timeout_s=90)
    await until("the engine is back after the reboot", lambda: connects(address, port, GATEWAY), timeout_s=90)
    assert not connects(address, 22, STRANGER)  # the firewall is outside the machine: unchanged by a reboot
    assert await chat(transport, key)

    assert (await client.delete(f"/api/v1/replicas/{replica_id}")).status_code == 204
    await drive_to(deps, replica_id, S.TERMINATED)

    assert machines.leftovers(replica_id) == []  # no process, interface, overlay, directory or nft table
    assert replica_id not in machines.owned()


class NoSudoMachines(WrappedBackend):
    """Machines whose login lost its sudo rights after boot (what an image without them is like)."""

    def __init__(self, inner: MachineBackend) -> None:
        super().__init__(inner)
        self.machines = inner

    def up(self, request: VmRequest) -> VmHandle:
        handle = self.inner.up(request)
        init = self.machines.init_pid(request.replica_id)
        subprocess.run(
            ["nsenter", "-t", str(init), "-m", "-p", "rm", "-f", "/etc/sudoers.d/90-cloud-init-users"],
            check=True,
        )
        return handle


async def test_a_login_without_sudo_fails_the_bootstrap_with_a_clear_error(
    deps: Deps, client: httpx.AsyncClient, machines: MachineBackend
) -> None:
    deps.managed.backend = NoSudoMachines(machines)
    model_id = await create_model(client, MODEL)
    details = vm_details(run_command=DOCKER_RUN, security_rules=[])
    r = await client.post(
        f"/api/v1/models/{model_id}/replicas", json={"create_vm": True, "vm_creation_details": details}
    )
    replica_id = int(r.json()["replica_id"])

    replica = await drive_to(deps, replica_id, S.TERMINATED)

    assert replica.termination_reason == "bootstrap_failed"
    assert replica.error_message is not None
    assert "sudo -n refused for ubuntu" in replica.error_message, replica.error_message
    [listed] = (await client.get(f"/api/v1/models/{model_id}/replicas")).json()
    assert (listed["vm_status"], listed["error_message"]) == ("FAILED", replica.error_message)
    assert machines.leftovers(replica_id) == []


def test_a_server_killed_while_bootstrapping_resumes_on_the_same_machine(tmp_path: Path) -> None:
    """`orchestrator serve` on `machine` VMs, SIGKILLed while it retries SSH: the machine outlives it, like a VM,
    and the next server finishes the same machine instead of making a second."""
    subnet = "10.213.1.0/24"
    env = {"ORCH_ADMIN_API_KEY": ADMIN, "ORCH_INFRA_BACKEND": "machine", "ORCH_MACHINE_SUBNET": subnet}
    settings = instance_settings(tmp_path / "state", "sqlite+aiosqlite://").model_copy(
        update={"infra_backend": "machine", "machine_subnet": subnet}
    )
    machines, _, _ = machine_backend(settings)  # the very backend the servers build, to look at it
    assert isinstance(machines, MachineBackend)
    address = machines.address(1)
    block = f"table inet {BLOCK_TABLE} {{\n chain output {{\n type filter hook output priority -10; policy accept;\n"
    block += f" ip daddr {address} tcp dport 22 drop\n }}\n}}\n"
    subprocess.run(["nft", "-f", "-"], input=block, text=True, check=True)
    headers = {"Authorization": f"Bearer {ADMIN}"}
    try:
        with serving(tmp_path / "state", env=env, stop_signal=signal.SIGKILL) as (base, _):
            model = httpx.post(f"{base}/api/v1/models", json={"name": MODEL}, headers=headers).json()
            details = vm_details(run_command=DOCKER_RUN, security_rules=[])
            body = {"create_vm": True, "vm_creation_details": details}
            r = httpx.post(f"{base}/api/v1/models/{model['id']}/replicas", json=body, headers=headers)
            replica_id = r.json()["replica_id"]
            poll(detail_of(base, replica_id), lambda b: b["status"] == "BOOTSTRAPPING", timeout_s=120)
        init = machines.init_pid(replica_id)
        assert init is not None  # the machine outlived the server
        assert machines.running(replica_id)

        subprocess.run(["nft", "delete", "table", "inet", BLOCK_TABLE], check=True)
        with serving(tmp_path / "state", env=env) as (base, _):
            detail = poll(detail_of(base, replica_id), lambda b: b["status"] in {"READY", "TERMINATED"}, timeout_s=120)
            assert detail["status"] == "READY", detail["events"]
            walk = [e["to_status"] for e in detail["events"] if e["from_status"] != e["to_status"]]
            assert walk == WALK
            assert machines.init_pid(replica_id) == init  # the same machine, never booted again
            assert machines.owned() == {replica_id}

            assert httpx.delete(f"{base}/api/v1/replicas/{replica_id}", headers=headers).status_code == 204
            poll(detail_of(base, replica_id), lambda b: b["status"] == "TERMINATED", timeout_s=60)
        assert machines.leftovers(replica_id) == []
    finally:
        unblock = f"add table inet {BLOCK_TABLE}\ndelete table inet {BLOCK_TABLE}\n"
        subprocess.run(["nft", "-f", "-"], input=unblock, text=True, check=True)
        for replica_id in machines.owned():
            machines.destroy(replica_id)


def detail_of(base: str, replica_id: int) -> Callable[[], dict[str, Any]]:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    return lambda: httpx.get(f"{base}/api/v1/replicas/{replica_id}", headers=headers, timeout=5).json()


async def test_an_engine_spec_replica_runs_the_pinned_image_with_its_sealed_environment(
    deps: Deps, client: httpx.AsyncClient, transport: httpx.ASGITransport, machines: MachineBackend
) -> None:
    token = "hf_secret_token_0123456789abcdef"
    model_id = await create_model(client, MODEL)
    engine = {"max_model_len": 2048, "env": {"VLLM_LOGGING_LEVEL": "INFO"}, "secret_env": {"HF_TOKEN": token}}
    details = vm_details(run_command=None, engine=engine, security_rules=[])
    r = await client.post(
        f"/api/v1/models/{model_id}/replicas", json={"create_vm": True, "vm_creation_details": details}
    )
    assert r.status_code == 201, r.text
    replica_id = int(r.json()["replica_id"])

    await drive_to(deps, replica_id, S.READY)

    _, key = await issue_key(client)
    assert await chat(transport, key)
    [engine_pid] = engine_pids(machines, replica_id)
    argv, environ = proc_strings(engine_pid, "cmdline"), proc_strings(engine_pid, "environ")
    assert argv[argv.index(b"--model") + 1] == MODEL.encode()
    assert argv[argv.index(b"--max-model-len") + 1] == b"2048"
    assert f"HF_TOKEN={token}".encode() in environ  # reached the engine through the env file and `-e HF_TOKEN`
    assert b"VLLM_LOGGING_LEVEL=INFO" in environ
    assert not any(token.encode() in a for a in argv)
    detail = (await client.get(f"/api/v1/replicas/{replica_id}")).text
    assert token not in detail
    assert '"HF_TOKEN"' in detail  # its name is shown, never its value
    row = await deps.store.replica(replica_id)
    assert row is not None
    assert token not in (row.engine_secrets_sealed or "")
    assert token not in (row.engine_spec or "")
    shown = (await client.get(f"/api/v1/replicas/{replica_id}")).json()
    assert shown["engine"]["secret_env"] == ["HF_TOKEN"]
    assert shown["engine"]["image"] == "vllm/vllm-openai:v0.11.0"
    assert "engine-sim: loading" in (shown["engine_log"] or "")  # read from the unit's journal before SSH closed
    assert [(s["step"], s["outcome"]) for s in shown["bootstrap"]] == [
        ("sudo", "unchanged"),
        ("gpu", "unchanged"),
        ("runtime", "unchanged"),
        ("work_dir", "changed"),
        ("install", "unchanged"),
        ("env_file", "changed"),
        ("service_file", "changed"),
        ("unit_file", "changed"),
        ("unit_installed", "changed"),
        ("start", "changed"),
        ("verify", "unchanged"),
    ]


def test_the_user_data_passes_the_schema_of_the_images_cloud_init(tmp_path: Path) -> None:
    """cloud-init warns about a document outside its schema and may ignore what it does not understand: the
    user-data every backend sends is checked by the cloud-init the machines boot with."""
    settings = instance_settings(tmp_path / "state", "sqlite+aiosqlite://")
    image = ensure_image(settings.machine_image_dir, ImageRecipe())
    document = tmp_path / "user-data"
    document.write_text(user_data(vm_request(3)))
    done = subprocess.run(
        [
            *("systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--read-only", f"--directory={image}"),
            *(f"--bind-ro={document}:/tmp/user-data", "cloud-init", "schema", "--config-file", "/tmp/user-data"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Valid cloud-config" in done.stdout


def test_a_machine_whose_nspawn_was_killed_is_still_destroyed_whole(tmp_path: Path) -> None:
    """kill -9 of a machine's supervisor and systemd-nspawn leaves its init running (as a VM outlives a crashed
    hypervisor process); destroying it must still find and stop everything inside."""
    settings = instance_settings(tmp_path / "state", "sqlite+aiosqlite://").model_copy(
        update={"infra_backend": "machine", "machine_subnet": "10.213.2.0/24"}
    )
    machines, _, _ = machine_backend(settings)
    assert isinstance(machines, MachineBackend)
    try:
        machines.up(vm_request(1))
        init = machines.init_pid(1)
        assert init is not None
        state = tmp_path / "state" / "machine" / "replica-1"
        for pid_file in ("supervisor.pid", "nspawn.pid"):
            os.kill(int((state / pid_file).read_text()), signal.SIGKILL)

        assert machines.init_pid(1) == init  # the machine goes on without them
        machines.destroy(1)

        assert machines.leftovers(1) == []
    finally:
        for replica_id in machines.owned():
            machines.destroy(replica_id)
