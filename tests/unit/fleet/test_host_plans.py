"""A replica placed on a shared host: its engine plan in a unit and directory of its own, given its GPUs and port."""

from __future__ import annotations

import shlex

import pytest

from infra.hosts import HostBook, HostLogin, Seat
from orchestrator.fleet.engine_plans import host_plans
from orchestrator.store.tables import Replica

LOGIN = HostLogin("gpu-1", "192.0.2.10", 22, "ubuntu", "unused", "ssh-ed25519 AAAA")
SECRETS = {"VLLM_API_KEY": "sk-engine"}


def book_with(replica_id: int, gpus: tuple[int, ...], port: int) -> HostBook:
    book = HostBook()
    book.replace([LOGIN], {replica_id: Seat(LOGIN, gpus, port)})
    return book


def test_an_engine_spec_replica_runs_in_its_own_unit_on_its_gpus_and_port() -> None:
    plan = host_plans(book_with(7, (2, 3), 8105))(Replica(id=7, model_id=1, port=8105), "llama", SECRETS)

    assert plan.unit_name == "orchestrator-engine-r7"
    assert plan.work_dir == "/opt/orchestrator-engine/replica-7"
    # Plain values on the command line: the env file's are secrets, redacted from outputs wherever they appear.
    assert plan.secret_env == SECRETS
    assert plan.serve_argv[:5] == ("env", "CUDA_VISIBLE_DEVICES=2,3", "ENGINE_PORT=8105", "/bin/sh", "-c")
    argv = shlex.split(plan.serve_argv[5])
    assert argv[argv.index("--name") + 1] == "orchestrator-engine-r7"  # two containers on one host never clash
    assert argv[argv.index("--gpus") + 1] == '"device=2,3"'  # Docker's own quoting of a device list
    assert argv[argv.index("-p") + 1] == "8105:8000"
    assert "CUDA_VISIBLE_DEVICES" not in argv  # the container's GPUs are renumbered from 0: not passed in


def test_a_run_command_gets_the_placed_gpus_and_the_port_by_variable() -> None:
    command = "docker run --gpus all -p $ENGINE_PORT:8000 vllm/vllm-openai:v0.11.0 --model m"
    plan = host_plans(book_with(3, (1,), 8101))(Replica(id=3, model_id=1, run_command=command), "m", SECRETS)

    assert plan.serve_argv == (
        "env",
        "CUDA_VISIBLE_DEVICES=1",
        "ENGINE_PORT=8101",
        "/bin/sh",
        "-c",
        "docker run -e VLLM_API_KEY --gpus '\"device=1\"' -p $ENGINE_PORT:8000 vllm/vllm-openai:v0.11.0 --model m",
    )


def test_a_replica_placed_nowhere_has_no_plan() -> None:
    with pytest.raises(ValueError, match="placed on no host"):
        host_plans(HostBook())(Replica(id=4, model_id=1), "m", SECRETS)
