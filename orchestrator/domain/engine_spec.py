"""A managed replica's engine when no `run_command` is given: the vLLM OpenAI server image, its model and arguments,
and its environment. Rendered into a `docker run` by the fleet's engine plans.

Secret environment values (an HF token) are not part of the spec: it names them, and their values are sealed at
rest beside it like the engine key, never shown.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

VLLM_IMAGE = "vllm/vllm-openai:v0.11.0"
"""The default image, pinned by tag: a replica is what it was when it was made, not what `latest` became."""
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
RESERVED_ENV = frozenset({"VLLM_API_KEY"})
"""Set by the orchestrator (the engine key)."""
RESERVED_ARGS = frozenset({"--api-key", "--port", "--host", "--served-model-name"})
"""Set by the orchestrator: the engine key, where it listens, the name the gateway routes by."""
IMAGE = re.compile(r"[a-z0-9][a-z0-9._/-]*(:[\w][\w.-]{0,127})?(@sha256:[0-9a-f]{64})?")


@dataclass(frozen=True)
class EngineSpec:
    image: str = VLLM_IMAGE
    model: str | None = None
    """What vLLM loads (a Hugging Face id); None: the model's name in the orchestrator."""
    tensor_parallel_size: int | None = None
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    extra_args: tuple[str, ...] = ()
    """More vLLM engine arguments, as on its command line (`--enable-prefix-caching`, `--dtype`, `bfloat16`)."""
    env: Mapping[str, str] = field(default_factory=dict)
    secret_env_names: tuple[str, ...] = ()
    """Names of the sealed variables (values elsewhere, never shown)."""

    def problems(self, secret_env: Mapping[str, str] | None = None) -> list[str]:
        """What is wrong with the spec (and the secret values given with it); empty when it can run."""
        secret_env = secret_env or {}
        found = []
        if not IMAGE.fullmatch(self.image):
            found.append(f"image {self.image!r} is not an image reference (name[:tag][@sha256:digest])")
        names = [*self.env, *secret_env]
        for name in names:
            if not ENV_NAME.fullmatch(name):
                found.append(f"environment variable name {name!r} is not a shell variable name")
            elif name in RESERVED_ENV:
                found.append(f"{name} is set by the orchestrator (the engine key)")
        if len(set(names)) != len(names):
            found.append("a variable is in both env and secret_env")
        for value in [*self.env.values(), *secret_env.values()]:
            if "\n" in value or "\0" in value:
                found.append("an environment value holds a line break or NUL")
                break
        for arg in self.extra_args:
            if arg.split("=", 1)[0] in RESERVED_ARGS:
                found.append(f"{arg.split('=', 1)[0]} is set by the orchestrator")
        return found

    def engine_args(self, served_name: str) -> list[str]:
        """vLLM's arguments after the image: the model, the name the gateway routes by, the tuning."""
        args = ["--model", self.model or served_name, "--served-model-name", served_name]
        for flag, value in (
            ("--tensor-parallel-size", self.tensor_parallel_size),
            ("--max-model-len", self.max_model_len),
            ("--gpu-memory-utilization", self.gpu_memory_utilization),
        ):
            if value is not None:
                args += [flag, str(value)]
        return [*args, *self.extra_args]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EngineSpec:
        data = json.loads(text)
        for name in ("extra_args", "secret_env_names"):  # JSON has no tuples
            data[name] = tuple(data[name])
        return cls(**data)
