"""How each backend's VMs install and run the engine.

GPU VMs (`hyperstack`, and `machine`, which boots like one): as the image's non-root login with `sudo -n`, a
systemd unit runs the replica's `run_command` (the toolkit's field, typically a `docker run` of the vLLM
image), or, for a replica without one, a `docker run` of its engine spec (by default the pinned vLLM OpenAI
server image serving the model). The engine key and the spec's environment reach the engine through the 0600
env file only: a `docker run` gets `-e NAME` for each, which Docker copies from the unit's environment, so no
value is ever on a command line. The local sandbox: the engine simulator under a pid file (no GPU, no systemd,
no model weights there).
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from infra.hosts import HostBook, unit_name, work_dir
from orchestrator.domain.engine_spec import EngineSpec
from orchestrator.fleet.ssh_access import PlanMaker
from orchestrator.store.tables import Replica
from provisioning.plan import EnginePlan

VM_WORK_DIR = "/opt/orchestrator-engine"


CONTAINER_PORT = 8000
"""The port vLLM listens on inside its container (published on the replica's port)."""
GPU_CHECK = "nvidia-smi -L 2>&1 || { echo 'no NVIDIA GPU: nvidia-smi is missing or lists no GPU'; exit 1; }"
DOCKER_CHECK = (
    "command -v docker >/dev/null || { echo 'docker is not installed (the VM image needs Docker and the NVIDIA "
    "container toolkit)'; exit 1; }; sudo -n docker info --format '{{json .Runtimes}}' 2>&1 | grep -q '\"nvidia\"'"
    " || { echo 'docker has no NVIDIA runtime (install the NVIDIA container toolkit)'; exit 1; }"
)
_DOCKER_RUN = re.compile(r"(?<![\w-])docker\s+run(?=\s|$)")
"""A `docker run` anywhere in the command (after `sudo`, after a `docker pull ... &&`)."""
_ALL_GPUS = re.compile(r"--gpus(?:\s+|=)all(?=\s|$)")


@dataclass(frozen=True)
class _Seat:
    """Where on its machine a replica's engine runs: a whole VM's defaults, or its own corner of a shared host."""

    work_dir: str = VM_WORK_DIR
    unit: str = "orchestrator-engine"
    gpus: str = "all"
    """Docker's `--gpus` value."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Plain variables the engine also gets (a host's CUDA_VISIBLE_DEVICES and ENGINE_PORT), on its command line by
    `env`: the env file's values are secrets, redacted from every output (a GPU index "0" would be everywhere)."""


def cloud_plans() -> PlanMaker:
    def plan(replica: Replica, model: str, secrets: Mapping[str, str]) -> EnginePlan:
        return _cloud_plan(replica, model, secrets, _Seat())

    return plan


def host_plans(book: HostBook) -> PlanMaker:
    """A cloud plan in the replica's own unit and directory on a shared host (`infra.hosts`), its engine given
    the placed GPUs (CUDA_VISIBLE_DEVICES; `--gpus device=...` for a `docker run`) and port (ENGINE_PORT, which
    a `run_command` should listen on)."""

    def plan(replica: Replica, model: str, secrets: Mapping[str, str]) -> EnginePlan:
        rid = replica.id or 0
        seat = book.seat(rid)
        if seat is None:
            raise ValueError(f"replica {rid} is placed on no host")
        devices = ",".join(map(str, seat.gpus))
        env = {"CUDA_VISIBLE_DEVICES": devices, "ENGINE_PORT": str(seat.engine_port)}
        where = _Seat(work_dir(rid), unit_name(rid), f'"device={devices}"' if devices else "0", env)
        return _cloud_plan(replica, model, secrets, where)

    return plan


def _cloud_plan(replica: Replica, model: str, secrets: Mapping[str, str], seat: _Seat) -> EnginePlan:
    env = dict(secrets)
    if replica.run_command:
        # The admin's shell command, kept as written; a `docker run` also gets the engine key from the unit's
        # environment (`-e NAME` copies it: the value is never on a command line).
        command = _DOCKER_RUN.sub("docker run -e VLLM_API_KEY", replica.run_command)
        if seat.gpus != "all":  # a shared host: the container sees the placed GPUs only
            command = _ALL_GPUS.sub(f"--gpus {shlex.quote(seat.gpus)}", command)
    else:
        spec = EngineSpec.from_json(replica.engine_spec) if replica.engine_spec else EngineSpec()
        env |= spec.env
        # The placement's variables stay out of the container: it sees its GPUs renumbered from 0.
        command = shlex.join(spec_command(spec, model, replica.port or 0, sorted(env), name=seat.unit, gpus=seat.gpus))
    program = (shlex.split(command) or ["sh"])[0]
    docker = _DOCKER_RUN.search(command) is not None
    return EnginePlan(
        serve_argv=(*_env_prefix(seat.env), "/bin/sh", "-c", command),
        secret_env=env,
        work_dir=seat.work_dir,
        unit_name=seat.unit,
        service="systemd",
        sudo=True,
        gpu_check=GPU_CHECK,
        runtime_check=DOCKER_CHECK if docker else None,
        install_check=f"command -v {shlex.quote(program)}",
        install=f"echo {shlex.quote(f'{program} is not installed on this VM image')} >&2; exit 1",
    )


def _env_prefix(env: Mapping[str, str]) -> tuple[str, ...]:
    return ("env", *(f"{name}={value}" for name, value in sorted(env.items()))) if env else ()


def spec_command(
    spec: EngineSpec,
    model: str,
    port: int,
    env_names: Sequence[str],
    *,
    name: str = "orchestrator-engine",
    gpus: str = "all",
) -> list[str]:
    """`docker run` of the spec's image serving `model` on the replica's port, each variable passed by name."""
    passed = [arg for name in env_names for arg in ("-e", name)]
    return [
        *("docker", "run", "--rm", "--name", name, "--runtime", "nvidia", "--gpus", gpus),
        *("--ipc=host", "-p", f"{port}:{CONTAINER_PORT}", *passed, spec.image),
        *spec.engine_args(model),
        *("--port", str(CONTAINER_PORT)),
    ]


def sandbox_plans(work_dir: Callable[[int], Path], python: str = sys.executable) -> PlanMaker:
    """The engine simulator, from this very installation, listening on the sandbox's own address."""

    def plan(replica: Replica, model: str, secrets: Mapping[str, str]) -> EnginePlan:
        argv = (python, "-m", "orchestrator.enginesim", "--model", model)
        return EnginePlan(
            serve_argv=(*argv, "--host", replica.vm_address or "", "--port", str(replica.port)),
            secret_env=dict(secrets),
            work_dir=str(work_dir(replica.id or 0)),
            service="pidfile",
            gpu_check=None,
            install_check=f"test -x {shlex.quote(python)}",
            install="echo 'the engine simulator comes with the orchestrator; reinstall it' >&2; exit 1",
        )

    return plan
