"""Processes of this host that a backend's VMs are made of (sshd, systemd-nspawn, their supervisors)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path


def alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie is dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] != "Z"
    return False


def read_pid(path: Path) -> int | None:
    """The pid a pid file holds, or None when there is none (missing, empty, not a number)."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def terminate(pids: Sequence[int], timeout_s: float) -> None:
    """SIGTERM, then SIGKILL whatever is still alive at the deadline."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.01)
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
