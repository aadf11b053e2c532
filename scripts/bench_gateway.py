"""Gateway benchmark: the same fast upstream direct, through vLLM's Rust router, through this gateway (one worker
at the default log level and at WARNING, two workers sharing their limits through Redis), and through the LiteLLM
proxy, side by side in one run, with wrk as the load generator.

    uv run python scripts/bench_gateway.py [--duration 10] [--rounds 3] [--only direct,router,info,...]

Prints a markdown table per round (req/s, p50, p99) for non-streaming calls at concurrency 32 and 1, and 20-chunk
streams at concurrency 32, then the ratios the targets are stated in, over the rounds. Everything runs on loopback
and stops by itself. vllm-router (a binary wheel on PyPI) is installed into a venv under ~/.cache when it is not on
PATH; a target that cannot run (no LiteLLM, no redis-server) has a row saying so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, cast

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


def start_gateway(
    workdir: Path, upstream: str, *, level: str, workers: int = 1, redis_url: str | None = None
) -> tuple[str, str, contextlib.ExitStack]:
    port = free_port()
    stack = contextlib.ExitStack()
    env = {
        **os.environ,
        "ORCH_STATE_DIR": str(workdir / f"state-{port}"),
        "ORCH_ADMIN_API_KEY": ADMIN,
        "ORCH_LOG_LEVEL": level,
        "ORCH_LOG_FORMAT": "json",
    }
    if redis_url is not None:
        env["ORCH_REDIS_URL"] = redis_url
    stack.enter_context(
        process(
            # `--workers` only when more than one: the script also measures older trees, for a before and after.
            [
                sys.executable,
                "-m",
                "api.cli",
                "serve",
                "--port",
                str(port),
                *(["--workers", str(workers)] if workers > 1 else []),
            ],
            env,
            workdir / f"gateway-{port}.log",
        )
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
    if workers > 1:
        # Every worker must know the key and the READY replica (they learn it from the change feed or their
        # periodic reload): wait until a call through each of several connections is answered.
        key_headers = {"Authorization": f"Bearer {applied['api_key']}"}
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        deadline = time.monotonic() + 30
        answered = 0
        while answered < 4 * workers:
            if time.monotonic() > deadline:
                raise RuntimeError("not every worker answered the bench key")
            with httpx.Client() as fresh:  # a new connection: granian spreads them over the workers
                ok = fresh.post(f"{base}/v1/chat/completions", json=body, headers=key_headers).status_code == 200
            answered = answered + 1 if ok else 0
            if not ok:
                time.sleep(0.1)
    return base, applied["api_key"], stack


def start_redis(workdir: Path) -> tuple[str, contextlib.ExitStack]:
    """A private Redis on loopback that keeps nothing on disk."""
    port = free_port()
    stack = contextlib.ExitStack()
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    stack.enter_context(process([*args, "--dir", str(workdir)], log=workdir / "redis.log"))
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            if s.recv(16).startswith(b"+PONG"):
                break
        if time.monotonic() > deadline:
            raise RuntimeError("redis-server did not come up")
        time.sleep(0.1)
    return f"redis://127.0.0.1:{port}/0", stack


ROUTER_VERSION = "0.1.17"
ROUTER_VENV = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / f"orchestrator-bench/vllm-router-{ROUTER_VERSION}"
)


def find_vllm_router(explicit: str | None) -> tuple[str | None, str]:
    """(the vllm-router binary, or None and why): `explicit`, PATH, or the bench's own venv, installed from PyPI
    (a binary wheel) when missing."""
    if explicit:
        return (explicit, "") if Path(explicit).exists() else (None, f"not found at {explicit}")
    found = shutil.which("vllm-router")
    if found:
        return found, ""
    binary = ROUTER_VENV / "bin" / "vllm-router"
    if not binary.exists():
        print(f"installing vllm-router=={ROUTER_VERSION} into {ROUTER_VENV}", file=sys.stderr)
        try:
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(ROUTER_VENV)], check=True)
            pip = [str(ROUTER_VENV / "bin" / "python"), "-m", "pip", "install", "-q", f"vllm-router=={ROUTER_VERSION}"]
            subprocess.run(pip, check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            return None, f"could not be installed ({e})"
    return str(binary), ""


def start_vllm_router(binary: str, workdir: Path, upstream: str) -> tuple[str, contextlib.ExitStack]:
    port = free_port()
    stack = contextlib.ExitStack()
    args = [binary, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", upstream]
    # Its metrics listener takes a fixed port unless told otherwise.
    args += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
    stack.enter_context(
        process([*args, "--policy", "round_robin", "--log-level", "warning"], log=workdir / "vllm-router.log")
    )
    wait_http(f"http://127.0.0.1:{port}/health", seconds=60)
    return f"http://127.0.0.1:{port}", stack


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


Start = Callable[[], tuple[str, str | None, contextlib.ExitStack]]


@dataclass
class Target:
    key: str
    """What `--only` names it by."""
    name: str
    start: Start | None
    """None: it cannot run here (`why`)."""
    why: str = ""


def cells(url: str, api_key: str | None, bodies: tuple[str, str], duration: int, workdir: Path) -> dict[str, Result]:
    plain, stream = bodies
    # Warm up: connection pools, caches, the first-call imports of each server.
    wrk(url, plain, api_key, connections=8, duration=2, workdir=workdir)
    return {
        "c32": wrk(url, plain, api_key, connections=32, duration=duration, workdir=workdir),
        "c1": wrk(url, plain, api_key, connections=1, duration=duration, workdir=workdir),
        "stream": wrk(url, stream, api_key, connections=32, duration=duration, workdir=workdir),
    }


def table(targets: list[Target], rows: dict[str, dict[str, Result]]) -> None:
    print(
        "| target | non-stream req/s (c=32) | p50 / p99 ms (c=32) | p50 ms (c=1) | 20-chunk streams/s (c=32) | errors |"
    )
    print("|---|---|---|---|---|---|")
    for t in targets:
        r = rows.get(t.key)
        if r is None:
            print(f"| {t.name} | not run: {t.why} | | | | |")
            continue
        errors = r["c32"].errors + r["c1"].errors + r["stream"].errors
        print(
            f"| {t.name} | {r['c32'].rps:,.0f} | {r['c32'].p50_ms:.2f} / {r['c32'].p99_ms:.2f} | {r['c1'].p50_ms:.2f} "
            f"| {r['stream'].rps:,.0f} | {errors} |"
        )


RATIOS = (
    ("gateway INFO / WARNING, non-stream", "info", "warning", "c32"),
    ("gateway 2 workers / 1 worker, non-stream", "workers", "info", "c32"),
    ("gateway 2 workers / vllm-router, non-stream", "workers", "router", "c32"),
    ("gateway 1 worker / vllm-router, non-stream", "info", "router", "c32"),
    ("gateway / LiteLLM, non-stream", "info", "litellm", "c32"),
    ("gateway / LiteLLM, streams", "info", "litellm", "stream"),
)


def ratios(rounds: list[dict[str, dict[str, Result]]]) -> None:
    for label, top, bottom, cell in RATIOS:
        seen = [r[top][cell].rps / r[bottom][cell].rps for r in rounds if top in r and bottom in r]
        if seen:
            print(f"{label}: " + ", ".join(f"{x:.2f}x" for x in seen))
    for r in rounds:
        if "info" in r and "direct" in r:
            print(f"added p50 latency at c=1: {r['info']['c1'].p50_ms - r['direct']['c1'].p50_ms:.2f} ms")


# -- the canned upstream: a fixed answer from a minimal server, so the proxies are measured, not the engine ----


def _chat_answer() -> bytes:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]
    text = " ".join(words[i % len(words)] for i in range(16))
    return json.dumps(
        {
            "id": "chatcmpl-canned",
            "object": "chat.completion",
            "created": 1,
            "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 16, "total_tokens": 26},
        },
        separators=(",", ":"),
    ).encode()


def _chat_stream() -> bytes:
    def event(doc: dict[str, object]) -> bytes:
        return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"

    head = {"id": "chatcmpl-canned", "object": "chat.completion.chunk", "created": 1, "model": MODEL}
    events = [
        event({**head, "choices": [{"index": 0, "delta": {"content": f" w{i}"}, "finish_reason": None}]})
        for i in range(20)
    ]
    events.append(
        event({**head, "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 20, "total_tokens": 27}})
    )
    return b"".join(events) + b"data: [DONE]\n\n"


def _http(status: str, content_type: bytes, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status}\r\ncontent-length: {len(body)}\r\n".encode()
    return head + b"content-type: " + content_type + b"\r\n\r\n" + body


class CannedUpstream(asyncio.Protocol):
    """An OpenAI-compatible engine that answers every call at once with the same bytes: `/health`, `/v1/models`,
    completions (the readiness probe), and chat, whole or streamed (20 chunks, then usage and `[DONE]`). HTTP/1.1
    keep-alive, bodies by Content-Length (what every client measured here sends)."""

    ANSWERS: ClassVar[dict[bytes, bytes]] = {
        b"GET /health": _http("200 OK", b"application/json", b"{}"),
        b"GET /v1/models": _http(
            "200 OK", b"application/json", json.dumps({"object": "list", "data": [{"id": MODEL}]}).encode()
        ),
        b"POST /v1/completions": _http(
            "200 OK",
            b"application/json",
            b'{"choices":[{"index":0,"text":" ok","finish_reason":"length"}],'
            b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}',
        ),
        b"POST /v1/chat/completions": _http("200 OK", b"application/json", _chat_answer()),
        b"stream": _http("200 OK", b"text/event-stream", _chat_stream()),
    }
    NOT_FOUND = _http("404 Not Found", b"application/json", b'{"detail":"Not Found"}')

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # uvloop's is not a subclass
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].lower()
            at = head.find(b"\r\ncontent-length:")
            length = int(head[at + 17 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            method, path = self.buffer_line(head)
            route = method + b" " + path
            if route == b"POST /v1/chat/completions" and b'"stream":true' in body.replace(b" ", b""):
                route = b"stream"
            self.transport.write(self.ANSWERS.get(route, self.NOT_FOUND))

    @staticmethod
    def buffer_line(head: bytes) -> tuple[bytes, bytes]:
        method, path, _ = head.split(b"\r\n", 1)[0].split(b" ", 2)
        return method.upper(), path.split(b"?", 1)[0]


def serve_canned(port: int) -> None:
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: PLC0415

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(CannedUpstream, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


def main() -> None:  # noqa: PLR0915  (the run's order, start to end)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per cell")
    parser.add_argument("--rounds", type=int, default=1, help="measure every target this many times, in turn")
    parser.add_argument("--workers", type=int, default=2, help="the gateway's workers in its multi-worker row")
    parser.add_argument("--only", default="", help="comma-separated: direct,router,info,warning,workers,litellm")
    parser.add_argument("--litellm", default=shutil.which("litellm") or "/opt/litellm-venv/bin/litellm")
    parser.add_argument("--vllm-router", default=None, help="the vllm-router binary (default: PATH, or installed)")
    parser.add_argument(
        "--upstream",
        choices=["canned", "enginesim"],
        default="canned",
        help="canned: a fixed answer from a minimal server (fast enough not to be the limit); enginesim: the engine "
        "simulator (vLLM's request checks and token generation, a few thousand requests/s)",
    )
    parser.add_argument("--serve-canned", type=int, default=None, help=argparse.SUPPRESS)  # the upstream process
    args = parser.parse_args()
    if args.serve_canned is not None:
        serve_canned(args.serve_canned)
        return
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk")
    only = set(filter(None, args.only.split(",")))
    workdir = Path(tempfile.mkdtemp(prefix="orch-bench-"))
    plain = f'{{"model":"{MODEL}","messages":[{{"role":"user","content":"hello there"}}],"max_tokens":16}}'
    stream = (
        f'{{"model":"{MODEL}","messages":[{{"role":"user","content":"hello"}}],"max_tokens":20,"stream":true,'
        '"stream_options":{"include_usage":true}}'
    )
    upstream_port = free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    router, router_why = find_vllm_router(args.vllm_router) if not only or "router" in only else (None, "")
    redis = shutil.which("redis-server")

    def direct() -> tuple[str, str | None, contextlib.ExitStack]:
        return f"{upstream}/v1/chat/completions", None, contextlib.ExitStack()

    def vllm_router() -> tuple[str, str | None, contextlib.ExitStack]:
        assert router is not None
        base, stack = start_vllm_router(router, workdir, upstream)
        return f"{base}/v1/chat/completions", None, stack

    def gateway(level: str, workers: int = 1) -> Start:
        def start() -> tuple[str, str | None, contextlib.ExitStack]:
            stack = contextlib.ExitStack()
            redis_url = None
            if workers > 1:
                redis_url, redis_stack = start_redis(workdir)
                stack.enter_context(redis_stack)
            base, key, gateway_stack = start_gateway(
                workdir, upstream, level=level, workers=workers, redis_url=redis_url
            )
            stack.enter_context(gateway_stack)
            return f"{base}/v1/chat/completions", key, stack

        return start

    def litellm() -> tuple[str, str | None, contextlib.ExitStack]:
        lite, stack = start_litellm(args.litellm, workdir, upstream)
        return f"{lite}/v1/chat/completions", LITELLM_KEY, stack

    many = f"this gateway, {args.workers} workers (Redis), INFO"
    targets = [
        Target("direct", "the upstream direct", direct),
        Target(
            "router",
            f"vllm-router {ROUTER_VERSION} (Rust, round robin, no auth, no billing)",
            vllm_router if router else None,
            router_why,
        ),
        Target("info", "this gateway, 1 worker, INFO (the default)", gateway("INFO")),
        Target("warning", "this gateway, 1 worker, WARNING", gateway("WARNING")),
        Target("workers", many, gateway("INFO", args.workers) if redis else None, "redis-server is not installed"),
        Target(
            "litellm",
            "LiteLLM proxy (1 worker)",
            litellm if Path(args.litellm).exists() else None,
            f"not found at {args.litellm}",
        ),
    ]
    targets = [t for t in targets if not only or t.key in only]
    rounds: list[dict[str, dict[str, Result]]] = []
    if args.upstream == "canned":
        upstream_args = [sys.executable, str(Path(__file__).resolve()), "--serve-canned", str(upstream_port)]
    else:
        upstream_args = [sys.executable, "-m", "orchestrator.enginesim", "--model", MODEL, "--port", str(upstream_port)]
    with process(upstream_args, log=workdir / "upstream.log"):
        wait_http(f"{upstream}/health")
        for n in range(args.rounds):
            rows: dict[str, dict[str, Result]] = {}
            # Each target runs alone: started, measured, stopped, so no idle proxy takes CPU from another's cells.
            for t in targets:
                if t.start is None:
                    continue
                url, api_key, stack = t.start()
                with stack:
                    rows[t.key] = cells(url, api_key, (plain, stream), args.duration, workdir)
            rounds.append(rows)
            print(
                f"\nround {n + 1} of {args.rounds}: nproc={os.cpu_count()}, wrk {args.duration} s per cell, "
                f"upstream: {args.upstream}\n"
            )
            table(targets, rows)
            sys.stdout.flush()
    print()
    ratios(rounds)
    print(f"\n(wrk output and server logs: {workdir})")


if __name__ == "__main__":
    main()
