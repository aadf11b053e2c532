"""How a managed replica on a GPU cloud VM becomes an engine plan: its `run_command` kept as written (a `docker run`
given the engine key by name), or, without one, a `docker run` rendered from its engine spec; no secret value is
ever on the command line."""

from __future__ import annotations

import shlex

import pytest

from orchestrator.domain.engine_spec import VLLM_IMAGE, EngineSpec
from orchestrator.fleet.engine_plans import DOCKER_CHECK, GPU_CHECK, VM_WORK_DIR, cloud_plans, spec_command
from orchestrator.store.tables import Replica
from provisioning.plan import EnginePlan

ENGINE_KEY = "sk-engine-key-value"
HF_TOKEN = "hf_secret_token_value"
SECRETS = {"VLLM_API_KEY": ENGINE_KEY}


def plan_of(replica: Replica, secrets: dict[str, str] | None = None) -> EnginePlan:
    return cloud_plans()(replica, "llama-3.1-8b", SECRETS if secrets is None else secrets)


def command_of(plan: EnginePlan) -> str:
    assert plan.serve_argv[:2] == ("/bin/sh", "-c")
    assert len(plan.serve_argv) == 3
    return plan.serve_argv[2]


def test_a_docker_run_command_gets_the_engine_key_by_name_and_is_otherwise_verbatim() -> None:
    run_command = (
        'docker run --gpus all -p 9000:8000 -e HF_TOKEN="$HF_TOKEN" vllm/vllm-openai:v0.11.0 --model m && echo done'
    )

    plan = plan_of(Replica(model_id=1, run_command=run_command, port=9000))

    assert command_of(plan) == (
        'docker run -e VLLM_API_KEY --gpus all -p 9000:8000 -e HF_TOKEN="$HF_TOKEN" vllm/vllm-openai:v0.11.0'
        " --model m && echo done"
    )
    assert plan.secret_env == SECRETS
    assert plan.sudo is True
    assert plan.service == "systemd"
    assert plan.work_dir == VM_WORK_DIR
    assert plan.gpu_check == GPU_CHECK
    assert plan.runtime_check == DOCKER_CHECK
    assert plan.install_check == "command -v docker"


@pytest.mark.parametrize(
    ("run_command", "rendered"),
    [
        ("sudo docker run --rm img", "sudo docker run -e VLLM_API_KEY --rm img"),
        (
            "docker pull img:1 && docker run --gpus all img:1",
            "docker pull img:1 && docker run -e VLLM_API_KEY --gpus all img:1",
        ),
        ("nvidia-docker run img", "nvidia-docker run img"),  # another program whose name ends in docker
    ],
)
def test_every_docker_run_in_the_command_gets_the_key(run_command: str, rendered: str) -> None:
    plan = plan_of(Replica(model_id=1, run_command=run_command))

    assert command_of(plan) == rendered
    assert (plan.runtime_check is not None) == ("-e VLLM_API_KEY" in rendered)


def test_a_command_that_is_not_docker_run_is_kept_as_is_with_no_runtime_check() -> None:
    plan = plan_of(Replica(model_id=1, run_command="vllm serve m --port 8000", port=8000))

    assert command_of(plan) == "vllm serve m --port 8000"
    assert plan.runtime_check is None
    assert plan.install_check == "command -v vllm"
    assert plan.install == "echo 'vllm is not installed on this VM image' >&2; exit 1"
    assert plan.sudo is True
    assert plan.service == "systemd"
    assert plan.secret_env == SECRETS


def test_another_docker_command_gets_no_key_and_no_runtime_check() -> None:
    plan = plan_of(Replica(model_id=1, run_command="docker compose up"))

    assert command_of(plan) == "docker compose up"
    assert plan.runtime_check is None
    assert plan.install_check == "command -v docker"


def test_without_run_command_the_default_spec_runs_the_pinned_vllm_image() -> None:
    plan = plan_of(Replica(model_id=1, port=9000))

    assert shlex.split(command_of(plan)) == [
        *("docker", "run", "--rm", "--name", "orchestrator-engine", "--runtime", "nvidia", "--gpus", "all"),
        *("--ipc=host", "-p", "9000:8000", "-e", "VLLM_API_KEY", VLLM_IMAGE),
        *("--model", "llama-3.1-8b", "--served-model-name", "llama-3.1-8b", "--port", "8000"),
    ]
    assert plan.runtime_check == DOCKER_CHECK
    assert plan.install_check == "command -v docker"
    assert plan.sudo is True


def test_the_spec_passes_every_variable_by_name_sorted_and_never_a_value() -> None:
    spec = EngineSpec(
        image="vllm/vllm-openai:v0.10.2",
        model="meta-llama/Llama-3.1-8B-Instruct",
        tensor_parallel_size=2,
        max_model_len=8192,
        gpu_memory_utilization=0.9,
        extra_args=("--enable-prefix-caching", "--dtype", "bfloat16"),
        env={"VLLM_LOGGING_LEVEL": "DEBUG", "A_FIRST": "plain-value"},
        secret_env_names=("HF_TOKEN",),
    )
    secrets = {"VLLM_API_KEY": ENGINE_KEY, "HF_TOKEN": HF_TOKEN}

    plan = plan_of(Replica(model_id=1, port=9100, engine_spec=spec.to_json()), secrets)

    command = command_of(plan)
    assert shlex.split(command) == [
        *("docker", "run", "--rm", "--name", "orchestrator-engine", "--runtime", "nvidia", "--gpus", "all"),
        *("--ipc=host", "-p", "9100:8000"),
        *("-e", "A_FIRST", "-e", "HF_TOKEN", "-e", "VLLM_API_KEY", "-e", "VLLM_LOGGING_LEVEL"),
        "vllm/vllm-openai:v0.10.2",
        *("--model", "meta-llama/Llama-3.1-8B-Instruct", "--served-model-name", "llama-3.1-8b"),
        *("--tensor-parallel-size", "2", "--max-model-len", "8192", "--gpu-memory-utilization", "0.9"),
        *("--enable-prefix-caching", "--dtype", "bfloat16", "--port", "8000"),
    ]
    for value in (ENGINE_KEY, HF_TOKEN, "plain-value", "DEBUG"):
        assert all(value not in arg for arg in plan.serve_argv)
    assert plan.secret_env == {
        "VLLM_API_KEY": ENGINE_KEY,
        "HF_TOKEN": HF_TOKEN,
        "VLLM_LOGGING_LEVEL": "DEBUG",
        "A_FIRST": "plain-value",
    }


def test_spec_command_passes_names_in_the_order_given_and_listens_on_the_container_port() -> None:
    argv = spec_command(EngineSpec(image="vllm/vllm-openai:v0.11.0"), "m", 8080, ["B", "A"])

    image_at = argv.index("vllm/vllm-openai:v0.11.0")
    assert argv[argv.index("-p") + 1] == "8080:8000"
    assert argv[image_at - 4 : image_at] == ["-e", "B", "-e", "A"]
    assert argv[image_at + 1 :] == ["--model", "m", "--served-model-name", "m", "--port", "8000"]
