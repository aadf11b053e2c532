"""Provisioning benchmark: POST -> READY time of managed replicas on the local sandbox backend (real sshd,
real nftables, SSH bootstrap, the engine simulator), through a real `orchestrator serve`.

    uv run python scripts/bench_provision.py [--parallel 50]   (as root: nftables enforces the rules)

Times come from the server's own replica events (PENDING's and READY's timestamps), so polling adds nothing.
Runs one replica alone, then `--parallel` replicas created at once; then deletes them all and times the teardown.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from bench_gateway import free_port, process, wait_http  # the script's own folder is on sys.path

ADMIN = "sk-bench-provision-admin-0123456789"
HEADERS = {"Authorization": f"Bearer {ADMIN}"}
DETAILS = {
    "name": "bench-vm",
    "environment_name": "sandbox",
    "image_name": "sandbox",
    "flavor_name": "sandbox",
    "key_name": "bench",
    "port": 8000,
    "run_command": "vllm serve bench",
}


def create(base: str, model_id: int) -> int:
    r = httpx.post(
        f"{base}/api/v1/models/{model_id}/replicas",
        json={"create_vm": True, "vm_creation_details": DETAILS},
        headers=HEADERS,
        timeout=30,
    )
    r.raise_for_status()
    return int(r.json()["replica_id"])


def wait_for(base: str, ids: list[int], status: str, timeout_s: float) -> dict[int, dict[str, Any]]:
    deadline, done = time.monotonic() + timeout_s, {}
    with httpx.Client(base_url=base, headers=HEADERS, timeout=30) as client:
        while len(done) < len(ids):
            for rid in ids:
                if rid not in done:
                    body = client.get(f"/api/v1/replicas/{rid}").json()
                    if body["status"] == "TERMINATED" and status != "TERMINATED":
                        raise RuntimeError(f"replica {rid} failed: {body['error_message']}")
                    if body["status"] == status:
                        done[rid] = body
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(ids) - len(done)} replicas not {status} after {timeout_s} s")
            time.sleep(0.1)
    return done


def seconds_to(detail: dict[str, Any], status: str) -> float:
    at = {
        e["to_status"]: datetime.fromisoformat(e["at"]) for e in detail["events"] if e["from_status"] != e["to_status"]
    }
    return (at[status] - at["PENDING"]).total_seconds()


def run(base: str, model_id: int, n: int) -> None:
    started = time.monotonic()
    with ThreadPoolExecutor(min(n, 16)) as pool:
        ids = list(pool.map(lambda _: create(base, model_id), range(n)))
    ready = wait_for(base, ids, "READY", timeout_s=300)
    wall = time.monotonic() - started
    times = sorted(seconds_to(d, "READY") for d in ready.values())
    phases = {
        s: statistics.median(seconds_to(d, s) for d in ready.values())
        for s in ("PROVISIONING", "BOOTSTRAPPING", "STARTING", "SECURING")
    }
    print(
        f"{n:>3} replica(s): POST->READY median {times[len(times) // 2]:.2f} s, max {times[-1]:.2f} s, "
        f"wall {wall:.2f} s  (median reached: " + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items()) + ")"
    )
    started = time.monotonic()
    for rid in ids:
        httpx.delete(f"{base}/api/v1/replicas/{rid}", headers=HEADERS, timeout=30).raise_for_status()
    wait_for(base, ids, "TERMINATED", timeout_s=300)
    print(f"{n:>3} replica(s): deleted -> TERMINATED (VMs destroyed) in {time.monotonic() - started:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parallel", type=int, default=50)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("note: not root, so the sandbox rules are recorded but not enforced", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-provision-") as tmp, contextlib.ExitStack() as stack:
        port = free_port()
        env = {
            **os.environ,
            "ORCH_STATE_DIR": str(Path(tmp) / "state"),
            "ORCH_ADMIN_API_KEY": ADMIN,
            "ORCH_LOG_LEVEL": "WARNING",
            "ORCH_LOG_FORMAT": "json",
            "ORCH_SANDBOX_SUBNET": "127.99.0.0/16",
        }
        log = Path(tmp) / "server.log"
        stack.enter_context(process([sys.executable, "-m", "api.cli", "serve", "--port", str(port)], env, log))
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/health")
        model_id = httpx.post(f"{base}/api/v1/models", json={"name": "bench"}, headers=HEADERS).json()["id"]
        try:
            run(base, model_id, 1)
            run(base, model_id, args.parallel)
        except RuntimeError:
            print(log.read_text()[-3000:], file=sys.stderr)
            raise


if __name__ == "__main__":
    main()
