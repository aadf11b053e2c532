#!/usr/bin/python3
"""Stand-in for the `docker` CLI inside a `machine` sandbox VM, installed there as /usr/local/bin/docker.

A GPU cloud VM runs vLLM as the `vllm/vllm-openai` container image. This machine has no Docker engine, no
image registry and no GPU, so this stand-in answers the Docker calls the orchestrator's plans make (`info`,
`pull`, `run`, `rm -f`, `stop`, `--version`) and runs, for `docker run ... vllm/vllm-openai[:tag] ARGS`, the
engine simulator with the same model, port and API key in the foreground, as an attached `docker run` would.
What it honours of `run`: `--env-file`, `-e/--env`, `--name`, `-p/--publish`, `--network host`, `--gpus` and
`--runtime nvidia` (without either, vLLM finds no GPU: the stand-in fails the same way); the vLLM arguments
`--model` (or the model as first argument), `--served-model-name`, `--host`, `--port`, `--api-key` and
`--max-model-len`. Every other option is accepted and ignored. Standard library only: it runs on the VM's
own Python.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

IMAGE = re.compile(r"(docker\.io/)?vllm/vllm-openai(:[\w.-]+)?(@sha256:[0-9a-f]{64})?")
ENGINE_HOME = "/opt/engine-standin"
"""Where the image holds the engine simulator (its source and packages are mounted there at boot)."""
STATE_DIR = Path(os.environ.get("DOCKER_STANDIN_STATE", "/run/docker-standin"))
"""Pid files of running containers, by name."""
RUNTIMES = (
    '{"io.containerd.runc.v2":{"path":"runc"},"nvidia":{"path":"nvidia-container-runtime"},"runc":{"path":"runc"}}'
)
# `docker run` options that take no value (everything else starting with "-" takes one).
RUN_FLAGS = frozenset({"--rm", "-d", "--detach", "-i", "-t", "-it", "--interactive", "--tty", "--init", "--privileged"})
# vLLM options that take no value (everything else starting with "--" takes one).
VLLM_FLAGS = frozenset(
    {
        "--trust-remote-code",
        "--enforce-eager",
        "--enable-prefix-caching",
        "--no-enable-prefix-caching",
        "--enable-auto-tool-choice",
        "--disable-log-requests",
        "--disable-log-stats",
        "--enable-chunked-prefill",
        "--disable-frontend-multiprocessing",
    }
)


class Refused(Exception):
    """What Docker would answer with an error; the exit status is Docker's for it."""

    def __init__(self, message: str, status: int = 125) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Run:
    image: str = ""
    name: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    publish: dict[int, int] = field(default_factory=dict)  # container port -> VM port
    host_network: bool = False
    gpus: bool = False
    detach: bool = False
    args: list[str] = field(default_factory=list)


def parse_run(argv: Sequence[str], environ: dict[str, str]) -> Run:
    run = Run()
    items = list(argv)
    while items:
        item = items.pop(0)
        if not item.startswith("-"):
            run.image = item
            run.args = items
            break
        option, has_value, value = item.partition("=")
        if option in RUN_FLAGS:
            run.detach = run.detach or option in {"-d", "--detach"}
            continue
        if not has_value:
            if not items:
                raise Refused(f"flag needs an argument: {option}")
            value = items.pop(0)
        _run_option(run, option, value, environ)
    if not run.image:
        raise Refused('"docker run" requires at least 1 argument.')
    return run


def _run_option(run: Run, option: str, value: str, environ: dict[str, str]) -> None:
    if option in {"-e", "--env"}:
        name, has_value, val = value.partition("=")
        if has_value:
            run.env[name] = val
        elif name in environ:  # `-e NAME` passes the caller's value on, as Docker does
            run.env[name] = environ[name]
    elif option == "--env-file":
        try:
            lines = Path(value).read_text().splitlines()
        except OSError as e:
            raise Refused(f"open {value}: {e.strerror}") from None
        for line in lines:
            if line.strip() and not line.lstrip().startswith("#"):
                name, _, val = line.partition("=")
                run.env[name.strip()] = val
    elif option == "--name":
        run.name = value
    elif option in {"-p", "--publish"}:
        parts = value.split(":")
        container = int(parts[-1].split("/")[0])
        run.publish[container] = int(parts[-2]) if len(parts) > 1 else container
    elif option in {"--network", "--net"}:
        run.host_network = value == "host"
    elif option == "--gpus" or (option == "--runtime" and value == "nvidia"):
        run.gpus = True


@dataclass(frozen=True)
class Engine:
    model: str
    host: str
    port: int
    api_key: str | None
    max_model_len: str | None


def parse_vllm(args: Sequence[str], env: dict[str, str]) -> Engine:
    items = list(args)
    if items[:2] == ["vllm", "serve"]:  # the image's entrypoint given again
        items = items[2:]
    options: dict[str, str] = {}
    if items and not items[0].startswith("-"):
        options["--model"] = items.pop(0)
    while items:
        item = items.pop(0)
        option, has_value, value = item.partition("=")
        if option in VLLM_FLAGS or not option.startswith("--"):
            continue
        if not has_value:
            value = items.pop(0) if items and not items[0].startswith("--") else ""
        options[option] = value
    model = options.get("--served-model-name") or options.get("--model")
    if not model:
        raise Refused("vllm serve: error: the model is required (positional or --model)", status=2)
    return Engine(
        model=model.split()[0],
        host=options.get("--host", "0.0.0.0"),  # noqa: S104 (vLLM's default)
        port=int(options.get("--port", "8000")),
        api_key=options.get("--api-key") or env.get("VLLM_API_KEY"),
        max_model_len=options.get("--max-model-len"),
    )


def engine_argv(run: Run, python: str = "/usr/bin/python3") -> tuple[list[str], dict[str, str]]:
    """The engine simulator's command line and environment for a `docker run` of the vLLM image."""
    if not IMAGE.fullmatch(run.image):
        raise Refused(
            f"Unable to find image '{run.image}' locally\ndocker: Error response from daemon: pull access denied for "
            f"{run.image.split(':')[0]}, repository does not exist or may require 'docker login' "
            "(this machine's registry stand-in holds only vllm/vllm-openai)"
        )
    if run.detach:
        raise Refused("this stand-in runs containers attached only (a systemd unit keeps them running)")
    if not run.gpus:
        raise Refused("RuntimeError: No CUDA GPUs are available (add --gpus all or --runtime nvidia)", status=1)
    engine = parse_vllm(run.args, run.env)
    if run.host_network:
        host, port = "0.0.0.0", engine.port  # noqa: S104 (the VM's own interfaces, as --network host)
    elif engine.port in run.publish:
        host, port = "0.0.0.0", run.publish[engine.port]  # noqa: S104 (published on the VM's interfaces)
    else:
        host, port = "127.0.0.1", engine.port  # unpublished: nobody outside the container reaches it
    argv = [python, "-m", "orchestrator.enginesim", "--model", engine.model, "--host", host, "--port", str(port)]
    if engine.max_model_len:
        argv += ["--max-model-len", engine.max_model_len]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ENGINE_HOME}/src:{ENGINE_HOME}/site", **run.env}
    env.pop("VLLM_API_KEY", None)
    if engine.api_key:
        env["VLLM_API_KEY"] = engine.api_key
    return argv, env


def main(argv: Sequence[str]) -> int:
    command, rest = (argv[0], list(argv[1:])) if argv else ("", [])
    if command in {"--version", "version"}:
        print("Docker version 28.2.2, build e6534b4 (machine sandbox stand-in)")
    elif command == "info":
        print(RUNTIMES if "{{json .Runtimes}}" in " ".join(rest) else "Runtimes: io.containerd.runc.v2 nvidia runc")
    elif command == "pull":
        if not rest or not IMAGE.fullmatch(rest[-1]):
            raise Refused(f"Error response from daemon: pull access denied for {rest[-1] if rest else ''}", status=1)
        print(f"Status: Image is up to date for {rest[-1]}")
    elif command in {"rm", "stop", "kill"}:
        for name in (r for r in rest if not r.startswith("-")):
            _stop(name)
    elif command == "run":
        run = parse_run(rest, dict(os.environ))
        args, env = engine_argv(run)
        if run.name:
            STATE_DIR.mkdir(parents=True, exist_ok=True)
            (STATE_DIR / f"{run.name}.pid").write_text(str(os.getpid()))
        os.execve(args[0], args, env)  # noqa: S606 (the engine replaces this process, as an attached run)
    else:
        raise Refused(f"docker: '{command}' is not a docker command (machine sandbox stand-in)", status=1)
    return 0


def _stop(name: str) -> None:
    pid_file = STATE_DIR / f"{name}.pid"
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        pass
    pid_file.unlink(missing_ok=True)
    print(name)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except Refused as e:
        print(f"docker: {e}", file=sys.stderr)
        sys.exit(e.status)
