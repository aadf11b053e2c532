"""Gateway benchmark: the same fast upstream direct, through this gateway, and through the LiteLLM proxy,
side by side in one run, with wrk as the load generator.

    uv run python scripts/bench_gateway.py [--duration 10] [--litellm /path/to/venv/bin/litellm]

Prints a markdown table (req/s, p50, p99) for non-streaming calls at concurrency 32 and 1, and 20-chunk
streams at concurrency 32. Everything runs on loopback and stops by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

MODEL = "bench"
ADMIN = "sk-bench-admin"
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2).status_code < 500:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> Iterator[None]:
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if log:
            out.close()  # type: ignore[union-attr]


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def _ms(text: str) -> float:
    found = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if found is None:
        return float("nan")
    value, unit = found.groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def wrk(url: str, body: str, key: str | None, *, connections: int, duration: int, workdir: Path) -> Result:
    script = workdir / "post.lua"
    headers = 'wrk.headers["Content-Type"] = "application/json"\n'
    if key:
        headers += f'wrk.headers["Authorization"] = "Bearer {key}"\n'
    if key and key.startswith("br-"):  # a connector key: every call also lands in a chat session
        headers += 'wrk.headers["Session-Id"] = "bench-session"\n'
    script.write_text(f'wrk.method = "POST"\nwrk.body = [[{body}]]\n{headers}')
    threads = 1  # one load thread for every target: a second one takes CPU from the servers on 2 cores
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    with open(workdir / "wrk.log", "a") as log:
        log.write(f"--- {url} c={connections}\n{out}\n")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.MULTILINE).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.MULTILINE).group(1))  # type: ignore[union-attr]
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    for kind in re.findall(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(n) for n in kind)
    return Result(rps, p50, p99, errors)


def start_gateway(workdir: Path, upstream: str) -> tuple[str, str, contextlib.ExitStack]:
    port = free_port()
    stack = contextlib.ExitStack()
    env = {
        **os.environ,
        "ORCH_STATE_DIR": str(workdir / "state"),
        "ORCH_ADMIN_API_KEY": ADMIN,
        "ORCH_LOG_LEVEL": "WARNING",
        "ORCH_LOG_FORMAT": "json",
    }
    stack.enter_context(
        process([sys.executable, "-m", "api.cli", "serve", "--port", str(port)], env, workdir / "gateway.log")
    )
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/health")
    admin = {"Authorization": f"Bearer {ADMIN}"}
    # The full path: a priced model, a metered connector key bound to it (billing, chat records, sessions).
    priced = {"name": MODEL, "provider": "vllm", "price_in": 0.15, "price_out": 0.6}
    model_id = httpx.post(f"{base}/admin/model/save", json=priced, headers=admin).json()["data"]["id"]
    replica = httpx.post(
        f"{base}/api/v1/models/{model_id}/replicas", json={"endpoint": f"{upstream}/v1/chat/completions"}, headers=admin
    ).json()["replica_id"]
    deadline = time.monotonic() + 30
    while httpx.get(f"{base}/api/v1/replicas/{replica}", headers=admin).json()["status"] != "READY":
        if time.monotonic() > deadline:
            raise RuntimeError("the replica never became READY")
        time.sleep(0.1)
    applied = httpx.post(
        f"{base}/admin/api-key/apply", json={"name": "bench", "month_quota": 1000, "balance": 1000}, headers=admin
    ).json()["data"]
    bind = {"key_id": applied["id"], "model_id": model_id}
    httpx.post(f"{base}/admin/api-key/bind-or-unbind-model", json=bind, headers=admin)
    return base, applied["api_key"], stack


LITELLM_KEY = "sk-litellm-bench-master-key-0123456789"


def start_litellm(binary: str, workdir: Path, upstream: str) -> tuple[str, contextlib.ExitStack]:
    port = free_port()
    config = workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: {upstream}/v1\n"
        "      api_key: none\n"
    )
    env = {
        **os.environ,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
        "LITELLM_MASTER_KEY": LITELLM_KEY,
    }
    stack = contextlib.ExitStack()
    stack.enter_context(
        process(
            [binary, "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
            env,
            workdir / "litellm.log",
        )
    )
    wait_http(f"http://127.0.0.1:{port}/health/liveliness", seconds=180)
    return f"http://127.0.0.1:{port}", stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--litellm", default=shutil.which("litellm") or "/opt/litellm-venv/bin/litellm")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk")
    workdir = Path(tempfile.mkdtemp(prefix="orch-bench-"))
    plain = f'{{"model":"{MODEL}","messages":[{{"role":"user","content":"hello there"}}],"max_tokens":16}}'
    stream = (
        f'{{"model":"{MODEL}","messages":[{{"role":"user","content":"hello"}}],"max_tokens":20,"stream":true,'
        '"stream_options":{"include_usage":true}}'
    )
    upstream_port = free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    rows: dict[str, dict[str, Result]] = {}
    with process(
        [sys.executable, "-m", "orchestrator.enginesim", "--model", MODEL, "--port", str(upstream_port)],
        log=workdir / "engine.log",
    ):
        wait_http(f"{upstream}/health")

        # Each target runs alone: started, measured, stopped, so no idle proxy takes CPU from another's cells.
        def direct() -> tuple[str, str | None, contextlib.ExitStack]:
            return f"{upstream}/v1/chat/completions", None, contextlib.ExitStack()

        def gateway() -> tuple[str, str | None, contextlib.ExitStack]:
            base, key, stack = start_gateway(workdir, upstream)
            return f"{base}/v1/chat/completions", key, stack

        def litellm() -> tuple[str, str | None, contextlib.ExitStack]:
            lite, stack = start_litellm(args.litellm, workdir, upstream)
            return f"{lite}/v1/chat/completions", LITELLM_KEY, stack

        targets = [("direct to the engine", direct), ("this gateway", gateway)]
        if Path(args.litellm).exists():
            targets.append(("LiteLLM proxy (1 worker)", litellm))
        else:
            print(f"(LiteLLM not found at {args.litellm}: its row is left out)", file=sys.stderr)
        for name, start in targets:
            url, api_key, stack = start()
            with stack:
                # Warm up: connection pools, caches, the first-call imports of each server.
                wrk(url, plain, api_key, connections=8, duration=2, workdir=workdir)
                rows[name] = {
                    "c32": wrk(url, plain, api_key, connections=32, duration=args.duration, workdir=workdir),
                    "c1": wrk(url, plain, api_key, connections=1, duration=args.duration, workdir=workdir),
                    "stream": wrk(url, stream, api_key, connections=32, duration=args.duration, workdir=workdir),
                }
    print(f"nproc={os.cpu_count()}, wrk {args.duration} s per cell, engine simulator as the upstream\n")
    print(
        "| target | non-stream req/s (c=32) | p50 / p99 ms (c=32) | p50 ms (c=1) | 20-chunk streams/s (c=32) | errors |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        errors = r["c32"].errors + r["c1"].errors + r["stream"].errors
        print(
            f"| {name} | {r['c32'].rps:,.0f} | {r['c32'].p50_ms:.2f} / {r['c32'].p99_ms:.2f} | {r['c1'].p50_ms:.2f} "
            f"| {r['stream'].rps:,.0f} | {errors} |"
        )
    direct, ours = rows["direct to the engine"], rows["this gateway"]
    print(f"\nadded p50 latency at c=1: {ours['c1'].p50_ms - direct['c1'].p50_ms:.2f} ms")
    if "LiteLLM proxy (1 worker)" in rows:
        lite = rows["LiteLLM proxy (1 worker)"]
        print(f"gateway / LiteLLM, non-stream: {ours['c32'].rps / lite['c32'].rps:.1f}x")
        print(f"gateway / LiteLLM, streams: {ours['stream'].rps / lite['stream'].rps:.1f}x")


if __name__ == "__main__":
    main()
