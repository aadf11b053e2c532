"""The `docker` stand-in of the machine sandbox: how it reads `docker run`, what it refuses as Docker or vLLM would,
and the engine simulator command it runs in the container's place."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from infra.machine.standins import docker
from infra.machine.standins.docker import Refused, Run, engine_argv, main, parse_run
from orchestrator.domain.engine_spec import EngineSpec
from orchestrator.fleet.engine_plans import spec_command

SCRIPT = Path(docker.__file__)
IMAGE = "vllm/vllm-openai:v0.11.0"
PYTHON = "/usr/bin/python3"


def gpu_run(*args: str, **fields: object) -> Run:
    return Run(**{"image": IMAGE, "gpus": True, "args": list(args), **fields})  # type: ignore[arg-type]


def simulator(model: str, host: str, port: int) -> list[str]:
    return [PYTHON, "-m", "orchestrator.enginesim", "--model", model, "--host", host, "--port", str(port)]


# parse_run


def test_flags_take_no_value_and_the_image_ends_the_options() -> None:
    run = parse_run(["--rm", "-it", "--init", IMAGE, "--model", "m", "--rm"], {})

    assert run.image == IMAGE
    assert run.args == ["--model", "m", "--rm"]
    assert run.detach is False


@pytest.mark.parametrize("flag", ["-d", "--detach"])
def test_detach_is_noted(flag: str) -> None:
    assert parse_run([flag, IMAGE], {}).detach is True


def test_options_take_a_value_separately_or_after_an_equals_sign() -> None:
    run = parse_run(["--name", "engine", "--ipc", "host", "--shm-size=16g", "--ipc=host", IMAGE], {})

    assert run.name == "engine"
    assert run.image == IMAGE
    assert run.args == []


def test_env_by_name_is_taken_from_the_callers_environment_and_by_value_as_given() -> None:
    run = parse_run(
        ["-e", "VLLM_API_KEY", "-e", "MISSING", "--env", "A=1=2", "-e=B=", "--env=HF_TOKEN", IMAGE],
        {"VLLM_API_KEY": "sk-from-unit", "HF_TOKEN": "hf-x", "UNRELATED": "u"},
    )

    assert run.env == {"VLLM_API_KEY": "sk-from-unit", "A": "1=2", "B": "", "HF_TOKEN": "hf-x"}


def test_env_file_lines_skipping_blanks_and_comments(tmp_path: Path) -> None:
    env_file = tmp_path / "engine.env"
    env_file.write_text("# a comment\n\nVLLM_API_KEY=sk-file\n  # indented comment\nHF_HOME=/data/hf=x\n")

    run = parse_run(["--env-file", str(env_file), "-e", "HF_HOME=/override", IMAGE], {})

    assert run.env == {"VLLM_API_KEY": "sk-file", "HF_HOME": "/override"}


def test_a_missing_env_file_is_refused_as_docker_does(tmp_path: Path) -> None:
    missing = tmp_path / "nope.env"

    with pytest.raises(Refused) as refused:
        parse_run([f"--env-file={missing}", IMAGE], {})
    assert str(refused.value) == f"open {missing}: No such file or directory"
    assert refused.value.status == 125


def test_published_ports_by_container_port() -> None:
    run = parse_run(
        ["-p", "9000:8000", "--publish=127.0.0.1:9100:8100", "-p", "7000:7000/tcp", "-p", "6000", IMAGE], {}
    )

    assert run.publish == {8000: 9000, 8100: 9100, 7000: 7000, 6000: 6000}
    assert run.host_network is False


@pytest.mark.parametrize("args", [["--network", "host"], ["--network=host"], ["--net", "host"]])
def test_host_network(args: list[str]) -> None:
    assert parse_run([*args, IMAGE], {}).host_network is True


def test_another_network_is_not_the_hosts() -> None:
    assert parse_run(["--network", "bridge", IMAGE], {}).host_network is False


@pytest.mark.parametrize(
    ("args", "gpus"),
    [
        (["--gpus", "all"], True),
        (["--gpus=device=0"], True),
        (["--runtime", "nvidia"], True),
        (["--runtime=nvidia"], True),
        (["--runtime", "runc"], False),
        ([], False),
    ],
)
def test_gpus_from_gpus_or_the_nvidia_runtime(args: list[str], gpus: bool) -> None:
    assert parse_run([*args, IMAGE], {}).gpus is gpus


def test_no_image_is_docker_usage_error() -> None:
    with pytest.raises(Refused, match=r'^"docker run" requires at least 1 argument\.$'):
        parse_run(["--rm", "-e", "A=1"], {})


def test_an_option_without_its_value() -> None:
    with pytest.raises(Refused, match=r"^flag needs an argument: --name$"):
        parse_run(["--name"], {})


# engine_argv


def test_another_image_is_refused_with_dockers_message() -> None:
    with pytest.raises(Refused) as refused:
        engine_argv(Run(image="busybox:1.36", gpus=True))

    assert refused.value.status == 125
    message = str(refused.value)
    assert message.startswith("Unable to find image 'busybox:1.36' locally\n")
    assert "docker: Error response from daemon: pull access denied for busybox, repository does not exist" in message


@pytest.mark.parametrize(
    "image", ["vllm/vllm-openai", "docker.io/vllm/vllm-openai:latest", "vllm/vllm-openai@sha256:" + "a" * 64]
)
def test_the_vllm_image_in_its_forms(image: str) -> None:
    argv, _ = engine_argv(Run(image=image, gpus=True, args=["m"]), PYTHON)

    assert argv == simulator("m", "127.0.0.1", 8000)


def test_a_vllm_image_pinned_by_tag_and_digest_runs_as_in_docker() -> None:
    # EngineSpec accepts name:tag@sha256:digest (and Docker runs it); the stand-in must as well.
    image = "vllm/vllm-openai:v0.11.0@sha256:" + "a" * 64
    assert EngineSpec(image=image).problems() == []

    argv, _ = engine_argv(Run(image=image, gpus=True, args=["m"]), PYTHON)

    assert argv == simulator("m", "127.0.0.1", 8000)


def test_detached_runs_are_refused() -> None:
    with pytest.raises(Refused, match="attached only") as refused:
        engine_argv(gpu_run("m", detach=True))
    assert refused.value.status == 125


def test_without_gpus_vllm_finds_none() -> None:
    with pytest.raises(Refused, match=r"^RuntimeError: No CUDA GPUs are available") as refused:
        engine_argv(Run(image=IMAGE, args=["m"]))
    assert refused.value.status == 1


def test_a_published_port_listens_on_every_interface_at_the_vm_port() -> None:
    argv, _ = engine_argv(gpu_run("--model", "m", "--port", "8000", publish={8000: 9000}), PYTHON)

    assert argv == simulator("m", "0.0.0.0", 9000)


def test_publishing_another_port_leaves_the_engine_unreachable_from_outside() -> None:
    argv, _ = engine_argv(gpu_run("--model", "m", "--port=8001", publish={8000: 9000}), PYTHON)

    assert argv == simulator("m", "127.0.0.1", 8001)


def test_an_unpublished_port_listens_on_loopback_only() -> None:
    argv, _ = engine_argv(gpu_run("--model", "m", "--host", "0.0.0.0"), PYTHON)

    assert argv == simulator("m", "127.0.0.1", 8000)


def test_host_network_listens_on_the_engines_own_port() -> None:
    argv, _ = engine_argv(gpu_run("--model", "m", "--port", "9200", host_network=True, publish={9200: 1}), PYTHON)

    assert argv == simulator("m", "0.0.0.0", 9200)


def test_max_model_len_is_passed_on() -> None:
    argv, _ = engine_argv(gpu_run("m", "--max-model-len", "4096"), PYTHON)

    assert argv == [*simulator("m", "127.0.0.1", 8000), "--max-model-len", "4096"]


def test_the_api_key_argument_wins_over_the_environment() -> None:
    _, env = engine_argv(gpu_run("m", "--api-key", "sk-arg", env={"VLLM_API_KEY": "sk-env", "HF_TOKEN": "h"}))

    assert env["VLLM_API_KEY"] == "sk-arg"
    assert env["HF_TOKEN"] == "h"
    assert env["PATH"] == "/usr/bin:/bin"
    assert env["PYTHONPATH"] == f"{docker.ENGINE_HOME}/src:{docker.ENGINE_HOME}/site"


def test_the_api_key_from_the_containers_environment() -> None:
    _, env = engine_argv(gpu_run("m", env={"VLLM_API_KEY": "sk-env"}))

    assert env["VLLM_API_KEY"] == "sk-env"


def test_no_api_key_means_none_in_the_environment() -> None:
    _, env = engine_argv(gpu_run("m", env={"VLLM_API_KEY": ""}))

    assert "VLLM_API_KEY" not in env


@pytest.mark.parametrize(
    ("args", "model"),
    [
        (["org/weights"], "org/weights"),
        (["vllm", "serve", "org/weights", "--port", "8000"], "org/weights"),
        (["--model", "org/weights"], "org/weights"),
        (["--model=org/weights", "--trust-remote-code", "--dtype", "half"], "org/weights"),
        (["org/weights", "--served-model-name", "served"], "served"),
        (["--served-model-name=served", "--model", "org/weights"], "served"),
    ],
)
def test_the_model_served_is_the_served_name_else_the_model(args: list[str], model: str) -> None:
    argv, _ = engine_argv(gpu_run(*args), PYTHON)

    assert argv[argv.index("--model") + 1] == model


def test_no_model_is_vllms_usage_error() -> None:
    with pytest.raises(Refused, match="the model is required") as refused:
        engine_argv(gpu_run("--dtype", "half"))
    assert refused.value.status == 2


def test_the_orchestrators_spec_command_runs_under_the_stand_in() -> None:
    argv = spec_command(EngineSpec(max_model_len=2048), "llama", 9000, ["HF_TOKEN", "VLLM_API_KEY"])
    assert argv[:2] == ["docker", "run"]

    run = parse_run(argv[2:], {"VLLM_API_KEY": "sk-unit", "HF_TOKEN": "hf-x"})
    command, env = engine_argv(run, PYTHON)

    assert command == [*simulator("llama", "0.0.0.0", 9000), "--max-model-len", "2048"]
    assert env["VLLM_API_KEY"] == "sk-unit"
    assert env["HF_TOKEN"] == "hf-x"
    assert run.name == "orchestrator-engine"


# main and the script


def test_info_lists_the_nvidia_runtime_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--format", "{{json .Runtimes}}"]) == 0

    runtimes = json.loads(capsys.readouterr().out)
    assert "nvidia" in runtimes


def test_an_unknown_command_is_refused() -> None:
    with pytest.raises(Refused, match="'compose' is not a docker command") as refused:
        main(["compose", "up"])
    assert refused.value.status == 1


def test_the_script_refuses_another_image_with_dockers_status() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "run", "busybox"], capture_output=True, text=True, timeout=30, check=False
    )

    assert done.returncode == 125
    assert done.stdout == ""
    assert done.stderr.startswith("docker: Unable to find image 'busybox' locally\n")
    assert "pull access denied for busybox" in done.stderr
