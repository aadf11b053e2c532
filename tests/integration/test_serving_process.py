"""What a serving process sets in its interpreter once it has started, read in a process of its own (the settings are
process-wide): what it made to start is kept out of the collector's sight, and a thread beside the event loop waits
for the interpreter lock at most a millisecond."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from orchestrator.runtime.compose import SWITCH_INTERVAL_S

STARTED = """
import asyncio, gc, json, sys
from orchestrator.platform.settings import Settings
from orchestrator.runtime.compose import Runtime, build_deps

async def main():
    before = sys.getswitchinterval()
    deps = build_deps(Settings())
    runtime = Runtime(deps)
    await runtime.start()
    try:
        print(json.dumps({"before": before, "after": sys.getswitchinterval(), "frozen": gc.get_freeze_count()}))
    finally:
        await runtime.stop()
        await deps.engine.dispose()

asyncio.run(main())
"""


def test_a_started_process_freezes_what_it_made_and_shortens_the_lock_switch(tmp_path: Path) -> None:
    env = {**os.environ, "ORCH_STATE_DIR": str(tmp_path), "ORCH_SCHEDULER": "false", "ORCH_LOG_LEVEL": "WARNING"}
    env.pop("ORCH_DATABASE_URL", None)
    done = subprocess.run(
        [sys.executable, "-c", STARTED], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["before"] == 0.005  # Python's own, until the process has started
    assert seen["after"] == SWITCH_INTERVAL_S
    assert seen["frozen"] > 50_000
