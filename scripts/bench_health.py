"""Health sweep benchmark: how long one probe pass over N replicas takes (one aiohttp session, bounded
concurrency), against engine simulators on loopback.

    uv run python scripts/bench_health.py [--replicas 1000] [--engines 4]

READY replicas get a liveness probe (GET /health); STARTING ones the full readiness probe
(/health, /v1/models, a 1-token completion). Replicas are spread over a few simulator processes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any, cast

from bench_gateway import free_port, process, wait_http  # the script's own folder is on sys.path

from orchestrator.domain.lifecycle import ReplicaStatus
from orchestrator.fleet.health import HealthMonitor, HealthPolicy
from orchestrator.gateway.upstream import Upstream
from orchestrator.platform.secrets import SecretBox
from orchestrator.store.fleet import FleetStore
from orchestrator.store.tables import Replica

MODEL = "bench"


async def sweep(urls: list[str], n: int, status: ReplicaStatus) -> tuple[float, int]:
    upstream = Upstream()

    async def nothing() -> None:
        return None

    monitor = HealthMonitor(
        cast(FleetStore, None), upstream, SecretBox("bench"), HealthPolicy(), on_change=nothing, wake=lambda: None
    )
    replicas = [
        (Replica(id=i, model_id=1, endpoint=f"{urls[i % len(urls)]}/v1", status=status), MODEL) for i in range(n)
    ]
    await monitor.probe_all(replicas[:20])  # warm the connection pool, as a running server has it
    started = time.perf_counter()
    outcomes = await monitor.probe_all(replicas)
    elapsed = time.perf_counter() - started
    await upstream.close()
    return elapsed, sum(1 for o in outcomes if o is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=1000)
    parser.add_argument("--engines", type=int, default=4)
    args = parser.parse_args()
    ports = [free_port() for _ in range(args.engines)]
    stacks: list[Any] = []
    try:
        for port in ports:
            ctx = process([sys.executable, "-m", "orchestrator.enginesim", "--model", MODEL, "--port", str(port)])
            ctx.__enter__()
            stacks.append(ctx)
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        for url in urls:
            wait_http(f"{url}/health")
        for status, kind in ((ReplicaStatus.READY, "liveness"), (ReplicaStatus.STARTING, "readiness")):
            elapsed, failed = asyncio.run(sweep(urls, args.replicas, status))
            print(f"{args.replicas} replicas, {kind} sweep: {elapsed:.3f} s, {failed} failed")
    finally:
        for ctx in stacks:
            ctx.__exit__(None, None, None)


if __name__ == "__main__":
    main()
