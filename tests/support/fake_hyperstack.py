"""A fake of the Hyperstack REST API on a real socket: in-memory VMs, rules and keypairs, with their failure modes.

A new VM moves CREATING -> BUILD -> ACTIVE over successive GETs (`gets_per_status` GETs each), or to ERROR when
its name is in `failing_names`; with a floating IP asked for, the IP appears once ACTIVE. A VM's `key_name` must
name a keypair of its environment (`add_keypair_directly`: the admin makes them, not the orchestrator), else 400.
Unknown ids answer 404, a duplicate security rule 409, a wrong `api_key` header 401. `script` makes the next requests
to one route answer given failures (429, 503, 500 ..., with a `Retry-After`, carried out or not) first.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

Json = dict[str, Any]
RULE_KEYS = ("direction", "protocol", "ethertype", "remote_ip_prefix", "port_range_min", "port_range_max")
_STEPS = {"CREATING": "BUILD", "BUILD": "ACTIVE"}


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Scripted:
    """A failure answered instead of the route's own answer."""

    status: int
    retry_after: str | None = None
    """The `Retry-After` header sent with it, if any."""
    carried_out: bool = False
    """Whether the request is carried out all the same (a 500 after the VM was made): only its answer is lost."""


Answer = tuple[int, Json, dict[str, str]]
"""Status, JSON body and extra headers of one answer."""


@dataclass
class FakeHyperstack:
    api_key: str = "hs-test-key"
    gets_per_status: int = 1
    failing_names: set[str] = field(default_factory=set)
    vms: dict[int, Json] = field(default_factory=dict)
    keypairs: dict[int, Json] = field(default_factory=dict)
    created_payloads: list[Json] = field(default_factory=list)
    """Every create-VM body received, as sent."""
    requests: list[tuple[str, str]] = field(default_factory=list)
    """(method, path) of every authenticated request."""
    scripted: dict[tuple[str, str], list[Scripted]] = field(default_factory=dict)
    """(method, path) -> the failures its next requests get, in order."""
    base_url: str = ""
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(101))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- direct access for arranging and checking state

    def add_rule_directly(self, vm_id: int, rule: Json) -> Json:
        with self._lock:
            return self._add_rule(vm_id, rule)

    def add_keypair_directly(self, name: str, environment: str = "default-CANADA-1") -> int:
        """A keypair made outside the orchestrator (the admin's, or an older stack's own); returns its id."""
        with self._lock:
            kp_id = next(self._ids)
            self.keypairs[kp_id] = {"id": kp_id, "name": name, "environment": environment}
            return kp_id

    def add_vm_directly(self, name: str, labels: list[str], status: str = "ACTIVE") -> int:
        """A VM made outside the providers (one whose stack state was lost, or the user's own); returns its id."""
        with self._lock:
            vm_id = next(self._ids)
            self.vms[vm_id] = _new_vm(vm_id, name, "default-CANADA-1", labels, floating=False) | {"status": status}
            return vm_id

    def script(self, method: str, path: str, *answers: Scripted) -> None:
        """The next requests `method path` get these answers, one each, before the route answers again."""
        with self._lock:
            self.scripted.setdefault((method, path), []).extend(answers)

    def count(self, method: str, path: str) -> int:
        """How many `method path` requests came (scripted answers included)."""
        return self.requests.count((method, path))

    def vm_gets(self, vm_id: int) -> int:
        return self.count("GET", f"/core/virtual-machines/{vm_id}")

    # -- the API

    def handle(self, method: str, path: str, query: dict[str, str], body: Json) -> Answer:
        routes: list[tuple[str, str, Callable[..., Json]]] = [
            ("POST", r"/core/virtual-machines", self._create_vm),
            ("GET", r"/core/virtual-machines", self._list_vms),
            ("GET", r"/core/virtual-machines/(\d+)", self._get_vm),
            ("DELETE", r"/core/virtual-machines/(\d+)", self._delete_vm),
            ("PUT", r"/core/virtual-machines/(\d+)/label", self._set_labels),
            ("POST", r"/core/virtual-machines/(\d+)/sg-rules", self._post_rule),
            ("DELETE", r"/core/virtual-machines/(\d+)/sg-rules/(\d+)", self._delete_rule),
            ("DELETE", r"/core/keypair/(\d+)", self._delete_keypair),
        ]
        for route_method, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if match and method == route_method:
                with self._lock:
                    self.requests.append((method, path))
                    failures = self.scripted.get((method, path))
                    failure = failures.pop(0) if failures else None
                    if failure is not None and not failure.carried_out:
                        return _failed(failure)
                    try:
                        answer = handler(*map(int, match.groups()), query=query, body=body)
                    except ApiError as e:
                        return e.status, {"status": False, "message": str(e)}, {}
                    if failure is not None:  # carried out, but the answer is lost
                        return _failed(failure)
                    return 200, {"status": True, "message": "ok", **answer}, {}
        return 404, {"status": False, "message": f"no route {method} {path}"}, {}

    def _create_vm(self, *, query: dict[str, str], body: Json) -> Json:
        missing = [k for k in ("name", "environment_name", "flavor_name", "key_name", "count") if k not in body]
        if missing:
            raise ApiError(400, f"missing fields: {', '.join(missing)}")
        wanted = (body["key_name"], body["environment_name"])
        if not any((k["name"], k["environment"]) == wanted for k in self.keypairs.values()):
            # Names no keypair, as Hyperstack's wording may not: the provider's message must name it.
            raise ApiError(400, "invalid key_name")
        self.created_payloads.append(body)
        instances = []
        for _ in range(int(body["count"])):
            vm_id = next(self._ids)
            labels, floating = list(body.get("labels") or []), bool(body.get("assign_floating_ip"))
            self.vms[vm_id] = _new_vm(vm_id, body["name"], body["environment_name"], labels, floating)
            instances.append({"id": vm_id, "name": body["name"], "status": "CREATING"})
        return {"instances": instances}

    def _get_vm(self, vm_id: int, *, query: dict[str, str], body: Json) -> Json:
        vm = self._vm(vm_id)
        vm["_gets"] += 1
        if vm["status"] in _STEPS and vm["_gets"] >= self.gets_per_status:
            vm["_gets"] = 0
            vm["status"] = "ERROR" if vm["name"] in self.failing_names else _STEPS[vm["status"]]
            if vm["status"] == "ACTIVE" and vm["_floating"]:
                vm["floating_ip"] = f"203.0.113.{vm_id % 250}"
        return {"instance": _public(vm)}

    def _list_vms(self, *, query: dict[str, str], body: Json) -> Json:
        found = [_public(v) for v in self.vms.values() if query.get("search", "") in v["name"]]
        page, size = int(query.get("page", 1)), int(query.get("page_size", 20))
        return {
            "count": len(found),
            "page": page,
            "page_size": size,
            "instances": found[(page - 1) * size : page * size],
        }

    def _delete_vm(self, vm_id: int, *, query: dict[str, str], body: Json) -> Json:
        self._vm(vm_id)
        del self.vms[vm_id]
        return {}

    def _set_labels(self, vm_id: int, *, query: dict[str, str], body: Json) -> Json:
        self._vm(vm_id)["labels"] = list(body["labels"])
        return {}

    def _post_rule(self, vm_id: int, *, query: dict[str, str], body: Json) -> Json:
        return {"security_rule": self._add_rule(vm_id, body)}

    def _add_rule(self, vm_id: int, rule: Json) -> Json:
        vm = self._vm(vm_id)
        if any(all(r[k] == rule.get(k) for k in RULE_KEYS) for r in vm["security_rules"]):
            raise ApiError(409, "security rule already exists")
        created = {"id": next(self._ids), **{k: rule.get(k) for k in RULE_KEYS}, "status": "active"}
        vm["security_rules"].append(created)
        return created

    def _delete_rule(self, vm_id: int, rule_id: int, *, query: dict[str, str], body: Json) -> Json:
        vm = self._vm(vm_id)
        kept = [r for r in vm["security_rules"] if r["id"] != rule_id]
        if len(kept) == len(vm["security_rules"]):
            raise ApiError(404, f"security rule {rule_id} not found")
        vm["security_rules"] = kept
        return {}

    def _delete_keypair(self, kp_id: int, *, query: dict[str, str], body: Json) -> Json:
        if self.keypairs.pop(kp_id, None) is None:
            raise ApiError(404, f"keypair {kp_id} not found")
        return {}

    def _vm(self, vm_id: int) -> Json:
        if vm_id not in self.vms:
            raise ApiError(404, f"virtual machine {vm_id} not found")
        return self.vms[vm_id]


def _failed(failure: Scripted) -> Answer:
    headers = {} if failure.retry_after is None else {"retry-after": failure.retry_after}
    return failure.status, {"status": False, "message": f"scripted {failure.status}"}, headers


def _new_vm(vm_id: int, name: str, environment: str, labels: list[str], floating: bool) -> Json:
    return {
        "id": vm_id,
        "name": name,
        "status": "CREATING",
        "fixed_ip": f"10.0.0.{vm_id % 250}",
        "floating_ip": None,
        "security_rules": [],
        "labels": labels,
        "environment": {"name": environment},
        "_gets": 0,
        "_floating": floating,
    }


def _public(vm: Json) -> Json:
    return {k: v for k, v in vm.items() if not k.startswith("_")}


def _handler_for(fake: FakeHyperstack) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urlsplit(self.path)
            answer: Answer
            if self.headers.get("api_key") != fake.api_key:
                answer = 401, {"status": False, "message": "Unauthorized: invalid api_key"}, {}
            else:
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length)) if length else {}
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                path = url.path.removeprefix("/v1") if url.path.startswith("/v1/") else "(outside /v1)"
                answer = fake.handle(self.command, path, query, body)
            status, body_json, headers = answer
            data = json.dumps(body_json).encode()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._serve()

        def do_POST(self) -> None:
            self._serve()

        def do_PUT(self) -> None:
            self._serve()

        def do_DELETE(self) -> None:
            self._serve()

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: the tests read `fake.requests` instead

    return Handler


@contextmanager
def running_fake_hyperstack(fake: FakeHyperstack | None = None) -> Iterator[FakeHyperstack]:
    """Serve the fake on 127.0.0.1 (a free port) in a thread; `fake.base_url` is where it answers."""
    fake = fake or FakeHyperstack()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(fake))
    server.daemon_threads = True
    # A short poll interval: shutdown() waits for the loop to look at its flag.
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), name="fake-hyperstack", daemon=True)
    thread.start()
    fake.base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
