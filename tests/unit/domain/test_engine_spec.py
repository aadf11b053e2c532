"""The engine spec of a replica without `run_command`: what makes it unrunnable, its JSON form, vLLM's arguments."""

from __future__ import annotations

import json

import pytest

from orchestrator.domain.engine_spec import VLLM_IMAGE, EngineSpec

DIGEST = "sha256:" + "0123456789abcdef" * 4


def test_the_default_spec_runs() -> None:
    assert EngineSpec().image == VLLM_IMAGE
    assert EngineSpec().problems() == []
    assert EngineSpec().problems({}) == []


@pytest.mark.parametrize(
    "image",
    [
        "vllm/vllm-openai",
        "vllm/vllm-openai:v0.11.0",
        "vllm/vllm-openai:latest",
        f"vllm/vllm-openai@{DIGEST}",
        f"vllm/vllm-openai:v0.11.0@{DIGEST}",
        "ghcr.io/org/engine-image:1.2_rc-3",
    ],
)
def test_image_references_that_run(image: str) -> None:
    assert EngineSpec(image=image).problems() == []


@pytest.mark.parametrize(
    "image",
    [
        "",
        "Vllm/vllm-openai",
        "vllm/vllm-openai:",
        "vllm/vllm-openai:v1 --privileged",
        "vllm/vllm-openai;rm -rf /",
        "-e X=1 vllm/vllm-openai",
        "vllm/vllm-openai@sha256:short",
        "vllm/vllm-openai:" + "t" * 129,
    ],
)
def test_bad_image_references(image: str) -> None:
    assert EngineSpec(image=image).problems() == [
        f"image {image!r} is not an image reference (name[:tag][@sha256:digest])"
    ]


@pytest.mark.parametrize("name", ["1ABC", "HF-TOKEN", "A B", "", "X=Y", "Ä"])
def test_environment_names_must_be_shell_variable_names(name: str) -> None:
    expected = [f"environment variable name {name!r} is not a shell variable name"]

    assert EngineSpec(env={name: "v"}).problems() == expected
    assert EngineSpec().problems({name: "v"}) == expected


def test_the_engine_key_variable_is_reserved_in_env_and_secret_env() -> None:
    expected = ["VLLM_API_KEY is set by the orchestrator (the engine key)"]

    assert EngineSpec(env={"VLLM_API_KEY": "x"}).problems() == expected
    assert EngineSpec().problems({"VLLM_API_KEY": "x"}) == expected


def test_a_variable_in_both_env_and_secret_env() -> None:
    spec = EngineSpec(env={"HF_TOKEN": "plain", "OTHER": "1"})

    assert spec.problems({"HF_TOKEN": "sealed"}) == ["a variable is in both env and secret_env"]
    assert spec.problems({"HF_HOME": "sealed"}) == []


@pytest.mark.parametrize("value", ["a\nb", "a\0b", "\n"])
def test_values_with_a_line_break_or_nul(value: str) -> None:
    expected = ["an environment value holds a line break or NUL"]

    assert EngineSpec(env={"A": value}).problems() == expected
    assert EngineSpec().problems({"A": value}) == expected
    assert EngineSpec(env={"A": value, "B": value}).problems({"C": value}) == expected  # said once


@pytest.mark.parametrize(
    ("arg", "flag"),
    [
        ("--api-key", "--api-key"),
        ("--api-key=sk-x", "--api-key"),
        ("--port=9", "--port"),
        ("--port", "--port"),
        ("--host=0.0.0.0", "--host"),
        ("--served-model-name", "--served-model-name"),
    ],
)
def test_arguments_the_orchestrator_sets_are_reserved(arg: str, flag: str) -> None:
    assert EngineSpec(extra_args=("--dtype", "bfloat16", arg)).problems() == [f"{flag} is set by the orchestrator"]


def test_unreserved_arguments_pass() -> None:
    spec = EngineSpec(extra_args=("--enable-prefix-caching", "--dtype=bfloat16", "--api-keys-file", "--portable"))

    assert spec.problems() == []


def test_every_problem_is_reported_together() -> None:
    spec = EngineSpec(image="BAD", env={"VLLM_API_KEY": "a\nb"}, extra_args=("--port=9",))

    assert spec.problems({"1X": "v"}) == [
        "image 'BAD' is not an image reference (name[:tag][@sha256:digest])",
        "VLLM_API_KEY is set by the orchestrator (the engine key)",
        "environment variable name '1X' is not a shell variable name",
        "an environment value holds a line break or NUL",
        "--port is set by the orchestrator",
    ]


def test_json_round_trip() -> None:
    spec = EngineSpec(
        image=f"vllm/vllm-openai:v0.11.0@{DIGEST}",
        model="meta-llama/Llama-3.1-8B-Instruct",
        tensor_parallel_size=4,
        max_model_len=32768,
        gpu_memory_utilization=0.85,
        extra_args=("--dtype", "bfloat16"),
        env={"VLLM_LOGGING_LEVEL": "DEBUG", "HF_HOME": "/data/hf"},
        secret_env_names=("HF_TOKEN",),
    )

    assert EngineSpec.from_json(spec.to_json()) == spec
    assert EngineSpec.from_json(EngineSpec().to_json()) == EngineSpec()


def test_json_holds_secret_names_but_no_secret_values() -> None:
    data = json.loads(EngineSpec(secret_env_names=("HF_TOKEN",)).to_json())

    assert data["secret_env_names"] == ["HF_TOKEN"]
    assert set(data) == {
        "image",
        "model",
        "tensor_parallel_size",
        "max_model_len",
        "gpu_memory_utilization",
        "extra_args",
        "env",
        "secret_env_names",
    }


def test_engine_args_default_the_model_to_the_served_name() -> None:
    assert EngineSpec().engine_args("llama") == ["--model", "llama", "--served-model-name", "llama"]


def test_engine_args_with_model_tuning_and_extra_arguments_in_order() -> None:
    spec = EngineSpec(
        model="org/weights",
        tensor_parallel_size=2,
        max_model_len=4096,
        gpu_memory_utilization=0.5,
        extra_args=("--enforce-eager", "--dtype", "half"),
    )

    assert spec.engine_args("served") == [
        *("--model", "org/weights", "--served-model-name", "served"),
        *("--tensor-parallel-size", "2", "--max-model-len", "4096", "--gpu-memory-utilization", "0.5"),
        *("--enforce-eager", "--dtype", "half"),
    ]


def test_engine_args_leave_out_unset_tuning() -> None:
    assert EngineSpec(max_model_len=2048).engine_args("m") == [
        *("--model", "m", "--served-model-name", "m", "--max-model-len", "2048"),
    ]
