"""The README's 'Try it' blocks, run as written against a fresh server."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.support.engines import free_port
from tests.support.server import orch_env, serving

README = Path(__file__).parents[2] / "README.md"


def _try_it_blocks() -> list[str]:
    text = README.read_text()
    section = text.split("## Try it", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)


def test_readme_examples_run(tmp_path: Path) -> None:
    blocks = _try_it_blocks()
    assert len(blocks) >= 3
    state = tmp_path / "state"
    with serving(state) as (base, _):
        env = orch_env(state) | {"ORCH_URL": base, "ENGINE_PORT": str(free_port())}
        script = "set -euo pipefail\n" + "\n".join(blocks)
        done = subprocess.run(
            ["bash", "-c", script], env=env, cwd=README.parent, capture_output=True, text=True, timeout=120, check=False
        )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert '{"model_name":"llama-3.1-8b","id":1}' in out
    assert '{"replica_id":1}' in out
    assert '"status":"READY"' in out
    assert '"object":"chat.completion"' in out
    assert '{"object":"list","data":[{"id":"llama-3.1-8b"' in out
    assert '"tables":[' in out
