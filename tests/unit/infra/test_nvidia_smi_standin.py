"""The `nvidia-smi` stand-in of the machine sandbox answers as a one-GPU host's nvidia-smi does."""

from __future__ import annotations

import subprocess
from pathlib import Path

from infra.machine import image

SCRIPT = image.STANDINS / "nvidia-smi"
UUID = "GPU-8fa781cd-b697-0104-374e-6a5cb5115534"


def nvidia_smi(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/bin/sh", str(SCRIPT), *args], capture_output=True, text=True, timeout=30, check=False)


def test_it_is_an_executable_sh_script() -> None:
    assert SCRIPT.read_text().startswith("#!/bin/sh\n")
    assert Path(SCRIPT).stat().st_mode & 0o111


def test_list_shows_one_gpu() -> None:
    done = nvidia_smi("-L")

    assert done.returncode == 0
    assert done.stdout == f"GPU 0: NVIDIA H200 (UUID: {UUID})\n"
    assert done.stderr == ""


def test_a_csv_query_prints_the_columns_asked_for() -> None:
    done = nvidia_smi("--query-gpu=index,name", "--format=csv")

    assert done.returncode == 0
    assert done.stdout == "index, name\n0, NVIDIA H200\n"


def test_no_arguments_prints_the_summary_table() -> None:
    done = nvidia_smi()

    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert lines[1].startswith("| NVIDIA-SMI 580.159.04")
    assert "CUDA Version: 13.0" in lines[1]
    assert any(line.startswith("|   0  NVIDIA H200 ") for line in lines)
    assert any("0MiB / 143771MiB" in line for line in lines)
    assert all(line.startswith(("+", "|")) for line in lines)


def test_unsupported_arguments_fail_with_usage_status() -> None:
    done = nvidia_smi("-q", "-d", "MEMORY")

    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == "nvidia-smi stand-in: unsupported arguments: -q -d MEMORY\n"
