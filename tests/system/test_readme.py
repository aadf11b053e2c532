"""The README's 'Try it' blocks, run as written against a fresh server."""

from __future__ import annotations

import contextlib
import os
import re
import signal
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
        env = orch_env(state) | {"ORCH_URL": base, "ENGINE_PORT": str(free_port()), "LLM_PORT": str(free_port())}
        script = "set -euo pipefail\n" + "\n".join(blocks)
        # Its own process group: whatever the blocks start (the engine simulator) dies with it, even on failure.
        proc = subprocess.Popen(
            ["bash", "-c", script],
            env=env,
            cwd=README.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out + err
    assert '{"model_name":"llama-3.1-8b","id":1}' in out
    assert '{"replica_id":1}' in out
    assert '{"replica_id":2}' in out
    assert "['PENDING', 'PROVISIONING', 'BOOTSTRAPPING', 'STARTING', 'SECURING', 'READY']" in out
    assert '"status":"READY"' in out
    assert '"object":"chat.completion"' in out
    assert '{"object":"list","data":[{"id":"llama-3.1-8b"' in out
    assert '"tables":[' in out
    # LlmEndpoint: a whole answer, an NDJSON stream, a queued task completed.
    assert '{"success":true,"response":"' in out
    assert '{"role":"assistant","content":"' in out
    assert '"status":"completed"' in out
    # LiteLLM's extras and Moonshot's endpoints.
    assert (
        '{"total_tokens":8,"request_model":"gpt-4o","model_used":"gpt-4o","tokenizer_type":"openai_tokenizer"}' in out
    )
    assert "x-litellm-priority: 1" in out
    assert '"hf-llama2-13b-gptq"' in out
    assert '{"message":"Endpoint added successfully"}' in out
    assert '"token":"********"' in out
    assert "engine-secret" not in out  # no answer shows a token
    assert "my-engine says: " in out
    assert '{"message":"Endpoint deleted successfully"}' in out


def test_the_readme_wait_ends_with_the_reason_when_the_replica_ends_instead(tmp_path: Path) -> None:
    """`wait_for ID READY` on a replica that never gets there (here: deleted before its engine came up) stops
    with the replica's reason, instead of polling forever."""
    setup = _try_it_blocks()[0]
    state = tmp_path / "state"
    with serving(state) as (base, _):
        env = orch_env(state) | {"ORCH_URL": base}
        script = (
            "set -uo pipefail\n" + setup + "\n"
            'admin -X POST "$ORCH_URL/api/v1/models" -d \'{"name": "m"}\' >/dev/null\n'
            f'admin -X POST "$ORCH_URL/api/v1/models/1/replicas" -d \'{{"endpoint": "http://127.0.0.1:{free_port()}/v1"}}\''
            " >/dev/null\n"
            '(sleep 0.5; admin -X DELETE "$ORCH_URL/api/v1/replicas/1") &\n'
            "wait_for 1 READY\n"
            'echo "exit=$?"\n'
        )
        done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert "exit=1" in done.stdout, done.stdout + done.stderr
    assert "replica 1 ended: deleted: None" in done.stderr
