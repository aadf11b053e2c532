"""How each backend's VMs install and run the engine.

GPU VMs (`hyperstack`, and `machine`, which boots like one): as the image's non-root login with `sudo -n`, a
systemd unit runs the replica's `run_command` (the toolkit's field, typically a `docker run` of the vLLM
image), or, for a replica without one, a `docker run` of the pinned vLLM OpenAI server image serving the model.
The engine key reaches the engine through the 0600 env file only: a `docker run` gets `-e VLLM_API_KEY`, which
Docker copies from the unit's environment, so it is never on a command line. The local sandbox: the engine
simulator under a pid file (no GPU, no systemd, no model weights there).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from orchestrator.fleet.ssh_access import PlanMaker
from orchestrator.store.tables import Replica
from provisioning.plan import EnginePlan

VM_WORK_DIR = "/opt/orchestrator-engine"


VLLM_IMAGE = "vllm/vllm-openai:v0.11.0"
"""The engine image of a replica that names no command, pinned by tag."""
CONTAINER_PORT = 8000
"""The port vLLM listens on inside its container (published on the replica's port)."""
GPU_CHECK = "nvidia-smi -L 2>&1 || { echo 'no NVIDIA GPU: nvidia-smi is missing or lists no GPU'; exit 1; }"
DOCKER_CHECK = (
    "command -v docker >/dev/null || { echo 'docker is not installed (the VM image needs Docker and the NVIDIA "
    "container toolkit)'; exit 1; }; sudo -n docker info --format '{{json .Runtimes}}' 2>&1 | grep -q '\"nvidia\"'"
    " || { echo 'docker has no NVIDIA runtime (install the NVIDIA container toolkit)'; exit 1; }"
)


def cloud_plans() -> PlanMaker:
    def plan(replica: Replica, model: str, engine_key: str) -> EnginePlan:
        argv = shlex.split(replica.run_command or "") or default_command(model, replica.port or 0)
        docker = argv[:2] == ["docker", "run"]
        if docker:
            argv = [*argv[:2], "-e", "VLLM_API_KEY", *argv[2:]]
        program = shlex.quote(argv[0])
        return EnginePlan(
            serve_argv=("/bin/sh", "-c", shlex.join(argv)),
            secret_env={"VLLM_API_KEY": engine_key},
            work_dir=VM_WORK_DIR,
            service="systemd",
            sudo=True,
            gpu_check=GPU_CHECK,
            runtime_check=DOCKER_CHECK if docker else None,
            install_check=f"command -v {program}",
            install=f"echo 'the engine command {program} is not installed on this VM image' >&2; exit 1",
        )

    return plan


def default_command(model: str, port: int) -> list[str]:
    """`docker run` of the pinned vLLM image serving `model` on the replica's port."""
    return [
        "docker",
        "run",
        "--rm",
        "--name",
        "orchestrator-engine",
        "--runtime",
        "nvidia",
        "--gpus",
        "all",
        "--ipc=host",
        "-p",
        f"{port}:{CONTAINER_PORT}",
        VLLM_IMAGE,
        "--model",
        model,
        "--port",
        str(CONTAINER_PORT),
    ]


def sandbox_plans(work_dir: Callable[[int], Path], python: str = sys.executable) -> PlanMaker:
    """The engine simulator, from this very installation, listening on the sandbox's own address."""

    def plan(replica: Replica, model: str, engine_key: str) -> EnginePlan:
        argv = (python, "-m", "orchestrator.enginesim", "--model", model)
        return EnginePlan(
            serve_argv=(*argv, "--host", replica.vm_address or "", "--port", str(replica.port)),
            secret_env={"VLLM_API_KEY": engine_key},
            work_dir=str(work_dir(replica.id or 0)),
            service="pidfile",
            gpu_check=None,
            install_check=f"test -x {shlex.quote(python)}",
            install="echo 'the engine simulator comes with the orchestrator; reinstall it' >&2; exit 1",
        )

    return plan
