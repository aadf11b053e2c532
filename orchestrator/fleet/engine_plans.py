"""How each backend's VMs install and run the engine: vLLM under systemd on GPU VMs, the engine simulator
under a pid file on sandbox VMs (no GPU, no systemd, no model weights here)."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from orchestrator.fleet.ssh_access import PlanMaker
from orchestrator.store.tables import Replica
from provisioning.plan import EnginePlan

VM_WORK_DIR = "/opt/orchestrator-engine"


def vllm_plans() -> PlanMaker:
    def plan(replica: Replica, model: str, engine_key: str) -> EnginePlan:
        return EnginePlan(
            serve_argv=("vllm", "serve", model, "--host", "0.0.0.0", "--port", str(replica.port)),  # noqa: S104 (the firewall decides who reaches it)
            secret_env={"VLLM_API_KEY": engine_key},
            work_dir=VM_WORK_DIR,
            service="systemd",
        )

    return plan


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
