"""Which host processes belong to a machine: found by its directory on their command line (the supervisor and
systemd-nspawn) while it is not booted, never another machine's whose directory name starts the same."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.machine import MachineBackend, MachineConfig


@pytest.fixture
def machines(tmp_path: Path) -> MachineBackend:
    return MachineBackend(
        MachineConfig(root=tmp_path, image_dir=tmp_path, enginesim_dir=tmp_path, site_packages=tmp_path)
    )


@pytest.fixture
def tenth(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process standing in for machine 10's supervisor: its directory on the command line."""
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", f"{tmp_path}/replica-10/supervisor.sh"]
    )
    # Until it has exec'd, a child's command line is still its parent's.
    deadline = time.monotonic() + 10
    while b"replica-10" not in Path(f"/proc/{process.pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline, "the stand-in process did not start"
        time.sleep(0.001)
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def test_a_machines_processes_are_its_own_not_those_of_a_machine_named_alike(
    machines: MachineBackend, tenth: subprocess.Popen[bytes]
) -> None:
    assert tenth.pid in machines.processes(10)
    assert tenth.pid not in machines.processes(1)  # replica-1 is a prefix of replica-10
