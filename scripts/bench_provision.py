"""Provisioning benchmark: POST -> READY time of managed replicas through a real `orchestrator serve`, on either
VM backend (as root: nftables enforces the rules, and machines need mounts and namespaces):

    uv run python scripts/bench_provision.py [--backend local] [--parallel 50]
    uv run python scripts/bench_provision.py --backend machine --parallel 10 [--no-run-command]

`local`: sandbox VMs (real sshd, real nftables, SSH bootstrap, the engine simulator). `machine`: booted Debian
machines (systemd-nspawn, cloud-init, systemd units; the cached image in ORCH_MACHINE_IMAGE_DIR, built first if
missing), bootstrapped through sudo, running a `docker run` of the vLLM image (the machine's docker stand-in runs
the engine simulator) or, with --no-run-command, the default engine spec.

Times come from the server's own replica events (PENDING's and READY's timestamps), so polling adds nothing.
Runs one replica alone, then `--parallel` replicas created at once; each round prints its slowest replica's
events, then deletes its replicas and times the teardown. Everything runs in a fresh temporary state directory on
its own subnet (`machine`: 10.213.200.0/22 unless --subnet; replica N owns its N-th /30). On the way out, even on
Ctrl-C, SIGTERM or a failure, the server is stopped and every VM still in that state directory or subnet is
destroyed with the server's own backend code: no machine, veth, mount, nft table or process is left.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import itertools
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
from bench_gateway import free_port, process, wait_http  # the script's own folder is on sys.path

from infra.machine import MachineBackend
from orchestrator.fleet.backend import VmBackend
from orchestrator.platform.settings import Settings
from orchestrator.platform.state_dir import ServerKeys
from orchestrator.runtime.compose import build_backend

ADMIN = "sk-bench-provision-admin-0123456789"
HEADERS = {"Authorization": f"Bearer {ADMIN}"}
MODEL = "bench-model"
DOCKER_RUN = (
    f"docker run --rm --runtime nvidia --gpus all -p 8000:8000 vllm/vllm-openai:v0.11.0 --model {MODEL} --port 8000"
)
PHASES = ("PROVISIONING", "BOOTSTRAPPING", "STARTING", "SECURING", "READY")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass(frozen=True)
class Backend:
    subnet: str
    """Where this run's VMs get their addresses: away from the tests' and a default server's."""
    details: dict[str, Any]
    run_command: str
    """The default run_command (the sandbox runs the engine simulator whatever it says)."""
    timeout_s: float
    poll_s: float
    """Between status polls: slower on `machine`, whose boots share the two cores with the server."""


BACKENDS = {
    "local": Backend(
        subnet="127.99.0.0/16",
        details={"environment_name": "sandbox", "image_name": "sandbox", "flavor_name": "sandbox"},
        run_command=f"vllm serve {MODEL}",
        timeout_s=300,
        poll_s=0.1,
    ),
    "machine": Backend(
        subnet="10.213.200.0/22",  # the tests use 10.213.0.0/24 and 10.213.1.0/24; replica N owns the N-th /30
        details={
            "environment_name": "default-CANADA-1",
            "image_name": "Ubuntu Server 22.04 LTS R535 CUDA 12.2",
            "flavor_name": "n3-A100x1",
        },
        run_command=DOCKER_RUN,
        timeout_s=900,
        poll_s=0.5,
    ),
}


def vm_details(backend: str, run_command: str | None) -> dict[str, Any]:
    details: dict[str, Any] = {"name": "bench-vm", "key_name": "bench", "port": 8000, **BACKENDS[backend].details}
    if run_command is not None:
        details["run_command"] = run_command
    return details


def create(base: str, model_id: int, details: dict[str, Any]) -> int:
    r = httpx.post(
        f"{base}/api/v1/models/{model_id}/replicas",
        json={"create_vm": True, "vm_creation_details": details},
        headers=HEADERS,
        timeout=30,
    )
    r.raise_for_status()
    return int(r.json()["replica_id"])


def wait_for(base: str, ids: list[int], status: str, timeout_s: float, poll_s: float) -> dict[int, dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    done: dict[int, dict[str, Any]] = {}
    with httpx.Client(base_url=base, headers=HEADERS, timeout=30) as client:
        while len(done) < len(ids):
            for rid in ids:
                if rid not in done:
                    body = client.get(f"/api/v1/replicas/{rid}").json()
                    if body["status"] == "TERMINATED" and status != "TERMINATED":
                        raise RuntimeError(f"replica {rid} failed: {body['error_message']}\n{timeline(body)}")
                    if body["status"] == status:
                        done[rid] = body
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(ids) - len(done)} replicas not {status} after {timeout_s} s")
            time.sleep(poll_s)
    return done


def _at(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["at"])


def reached(detail: dict[str, Any]) -> dict[str, datetime]:
    """When the replica entered each status (the first time)."""
    at: dict[str, datetime] = {}
    for e in detail["events"]:
        if e["from_status"] != e["to_status"]:
            at.setdefault(e["to_status"], _at(e))
    return at


def seconds_to(detail: dict[str, Any], status: str) -> float:
    at = reached(detail)
    return (at[status] - at["PENDING"]).total_seconds()


def spent_in(detail: dict[str, Any]) -> dict[str, float]:
    """Seconds spent in each status before the next one of the walk (PENDING .. SECURING)."""
    at = reached(detail)
    walk = ("PENDING", *PHASES)
    return {s: (at[n] - at[s]).total_seconds() for s, n in itertools.pairwise(walk)}


def timeline(detail: dict[str, Any]) -> str:
    start = reached(detail)["PENDING"]
    lines = []
    for e in detail["events"]:
        moved = f"{e['from_status']} -> {e['to_status']}" if e["from_status"] != e["to_status"] else e["to_status"]
        message = " ".join(str(e.get("message") or "").split())
        lines.append(
            f"    {(_at(e) - start).total_seconds():7.2f} s  {moved:<28} {e.get('reason') or '':<26} {message[:90]}"
        )
    return "\n".join(lines)


def run(base: str, model_id: int, n: int, backend: Backend, details: dict[str, Any]) -> None:
    started = time.monotonic()
    with ThreadPoolExecutor(min(n, 16)) as pool:
        ids = list(pool.map(lambda _: create(base, model_id, details), range(n)))
    ready = wait_for(base, ids, "READY", backend.timeout_s, backend.poll_s)
    wall = time.monotonic() - started
    times = sorted(seconds_to(d, "READY") for d in ready.values())
    spent = [spent_in(d) for d in ready.values()]
    phases = {s: statistics.median(p[s] for p in spent) for s in spent[0]}
    print(
        f"{n:>3} replica(s): POST->READY p50 {statistics.median(times):.2f} s, max {times[-1]:.2f} s, "
        f"wall {wall:.2f} s  (median time in: " + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items()) + ")",
        flush=True,
    )
    slowest = max(ready.values(), key=lambda d: seconds_to(d, "READY"))
    print(f"  the events of replica {slowest['id']}" + (", the slowest:" if n > 1 else ":"), flush=True)
    print(timeline(slowest), flush=True)
    started = time.monotonic()
    for rid in ids:
        httpx.delete(f"{base}/api/v1/replicas/{rid}", headers=HEADERS, timeout=30).raise_for_status()
    gone = wait_for(base, ids, "TERMINATED", backend.timeout_s, backend.poll_s)
    wall = time.monotonic() - started
    ends = [reached(d) for d in gone.values()]
    drain = sorted((at["TERMINATING"] - at["DRAINING"]).total_seconds() for at in ends)
    destroy = sorted((at["TERMINATED"] - at["TERMINATING"]).total_seconds() for at in ends)
    print(
        f"{n:>3} replica(s): deleted -> TERMINATED (VMs destroyed) in {wall:.2f} s  (DRAINING p50 "
        f"{statistics.median(drain):.2f} s, max {drain[-1]:.2f} s; TERMINATING, the VM's destroy, p50 "
        f"{statistics.median(destroy):.2f} s, max {destroy[-1]:.2f} s)",
        flush=True,
    )


def _interrupted(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM and SIGHUP stop the run as Ctrl-C does (so the teardown runs); the previous handlers come back at the
    end."""
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _interrupted)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def shielded_exit() -> Iterator[None]:
    """From the moment this context is left, stop signals are ignored: a second Ctrl-C cannot cut the teardown
    short (it is bounded: the server gets 15 s, each VM its backend's stop timeout)."""
    try:
        yield
    finally:
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        print("tearing down...", file=sys.stderr, flush=True)


def server_backend(backend_name: str, state_dir: Path, subnet: str) -> VmBackend:
    """The VM backend the server builds from this run's settings: the same code, to look at and clean up its VMs."""
    subnet_setting = "machine_subnet" if backend_name == "machine" else "sandbox_subnet"
    settings = Settings.model_validate({"state_dir": state_dir, "infra_backend": backend_name, subnet_setting: subnet})
    keys = ServerKeys(admin_api_key=ADMIN, secret_key="unused", generated_admin_key=False, admin_key_path=None)
    return build_backend(settings, keys)[0]


def taken(vms: VmBackend, ids: range) -> list[str]:
    """Host-wide names of this run's machines (after their addresses) that something else holds now: machines of
    an earlier run on the same subnet that were never destroyed."""
    if not isinstance(vms, MachineBackend):
        return []
    names = {f"--machine={vms.name(rid)}".encode() for rid in ids}
    found = [vms.veth(rid) for rid in ids if Path(f"/sys/class/net/{vms.veth(rid)}").exists()]
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and (held := names & set((entry / "cmdline").read_bytes().split(b"\0"))):
                found += [f"{b.decode()} (pid {entry.name})" for b in held]
    return found


def sweep(vms: VmBackend, ids: range) -> None:
    """Once the server has stopped: destroy every VM of this run's state directory and subnet (the server left
    them if it was stopped while they were being made), then check that nothing is left of them."""
    left = sorted(vms.owned())
    if left:
        print(f"destroying {len(left)} VM(s) the server left: replicas {left}", file=sys.stderr, flush=True)
    for rid in left:
        try:
            vms.destroy(rid)
        except Exception as e:  # noqa: BLE001 (go on with the others, then say what is left)
            print(f"destroying replica {rid}'s VM failed: {e}", file=sys.stderr, flush=True)
    leftovers = [f"replica {rid}'s VM" for rid in sorted(vms.owned())]
    if isinstance(vms, MachineBackend):
        leftovers += [what for rid in ids for what in vms.leftovers(rid)]
    if leftovers:
        print("LEFT BEHIND: " + ", ".join(leftovers), file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="local")
    parser.add_argument("--parallel", type=int, default=50)
    parser.add_argument("--subnet", help="this run's VM subnet (default: 127.99.0.0/16 local, 10.213.200.0/22 machine)")
    commands = parser.add_mutually_exclusive_group()
    commands.add_argument("--run-command", help=f"the replicas' run_command (default on machine: {DOCKER_RUN!r})")
    commands.add_argument(
        "--no-run-command", action="store_true", help="no run_command: the server's default engine spec"
    )
    args = parser.parse_args()
    backend = BACKENDS[args.backend]
    subnet = args.subnet or backend.subnet
    run_command = None if args.no_run_command else (args.run_command or backend.run_command)
    ids = range(1, 2 + args.parallel)  # one alone, then --parallel at once (a fresh database: ids from 1)
    if args.backend == "machine":
        blocks = ipaddress.ip_network(subnet).num_addresses // 4
        if ids[-1] >= blocks:
            parser.error(f"{subnet} has /30s for replicas 1-{blocks - 1}; this run uses {ids[0]}-{ids[-1]}")
        if os.geteuid() != 0:
            parser.error("the machine backend needs root (mounts, namespaces, nftables)")
    elif os.geteuid() != 0:
        print("note: not root, so the sandbox rules are recorded but not enforced", file=sys.stderr)
    print(
        f"backend {args.backend}, subnet {subnet}, replicas {ids[0]}-{ids[-1]}, run_command {run_command!r}",
        flush=True,
    )
    details = vm_details(args.backend, run_command)

    with (
        interruptible(),
        tempfile.TemporaryDirectory(prefix="bench-provision-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        state_dir = Path(tmp) / "state"
        vms = server_backend(args.backend, state_dir, subnet)
        if busy := taken(vms, ids):
            sys.exit(f"this run's machine names are in use (another run on {subnet}?): {', '.join(busy)}")
        stack.callback(sweep, vms, ids)  # the last thing: after the server has stopped
        port = free_port()
        env = {
            **os.environ,
            "ORCH_STATE_DIR": str(state_dir),
            "ORCH_ADMIN_API_KEY": ADMIN,
            "ORCH_LOG_LEVEL": "WARNING",
            "ORCH_LOG_FORMAT": "json",
            "ORCH_INFRA_BACKEND": args.backend,
            "ORCH_MACHINE_SUBNET" if args.backend == "machine" else "ORCH_SANDBOX_SUBNET": subnet,
        }
        log = Path(tmp) / "server.log"
        stack.enter_context(process([sys.executable, "-m", "api.cli", "serve", "--port", str(port)], env, log))
        stack.enter_context(shielded_exit())
        base = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{base}/health")
            model_id = httpx.post(f"{base}/api/v1/models", json={"name": MODEL}, headers=HEADERS).json()["id"]
            run(base, model_id, 1, backend, details)
            run(base, model_id, args.parallel, backend, details)
        except (RuntimeError, httpx.HTTPError):
            print(log.read_text()[-3000:], file=sys.stderr)
            raise


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as stopped:
        sys.exit(f"interrupted ({stopped or 'SIGINT'}); torn down")
