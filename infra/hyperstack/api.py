"""A small synchronous client for the Hyperstack REST calls the backend needs: VMs, security rules, keypairs.

Every failure leaves as a `BackendError` with a one-line message:

    BackendError (infra.vm)
     ├── HyperstackApiError   a call failed: `status` is the HTTP status (None when no answer came back)
     │    ├── NotFoundError   404: the thing is gone (deletes treat it as done)
     │    └── ConflictError   409: e.g. a security rule that already exists
     └── VmNotActive          a new VM went to ERROR (or elsewhere), or was not ACTIVE by the deadline
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any, Self

import httpx

from infra.vm import BackendError

JsonObject = dict[str, Any]

DEFAULT_BASE_URL = "https://infrahub-api.nexgencloud.com/v1"

_PENDING = frozenset({"CREATING", "BUILD"})
"""A new VM moves through these on its way to ACTIVE (or ERROR)."""


class HyperstackApiError(BackendError):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class NotFoundError(HyperstackApiError):
    pass


class ConflictError(HyperstackApiError):
    pass


class VmNotActive(BackendError):
    def __init__(self, message: str, vm_id: int, status: str | None) -> None:
        super().__init__(message)
        self.vm_id = vm_id
        self.status = status


class HyperstackClient:
    """One client per unit of work (`with HyperstackClient(...) as c:`); `transport` is the seam for tests."""

    def __init__(
        self, base_url: str, api_key: str, timeout: float = 30.0, transport: httpx.BaseTransport | None = None
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"api_key": api_key, "accept": "application/json"},
            timeout=timeout,
            transport=transport,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- virtual machines

    def create_vm(self, payload: JsonObject) -> JsonObject:
        """POST the payload (`count` must be 1); returns the one instance created (`id`, `status`, ...)."""
        answer = self._call("POST", "/core/virtual-machines", json=payload)
        instances = answer.get("instances") or []
        if len(instances) != 1 or not isinstance(instances[0], dict) or "id" not in instances[0]:
            raise HyperstackApiError(
                f"Hyperstack answered {len(instances)} VMs (or none with an id) where one was asked for"
            )
        instance: JsonObject = instances[0]
        return instance

    def get_vm(self, vm_id: int | str) -> JsonObject:
        return self._object("instance", "GET", f"/core/virtual-machines/{vm_id}")

    def list_vms(
        self, search: str | None = None, environment: str | None = None, page_size: int = 100
    ) -> list[JsonObject]:
        """Every VM matching the filters, across all pages."""
        params: dict[str, str | int] = {"page_size": page_size}
        if search is not None:
            params["search"] = search
        if environment is not None:
            params["environment"] = environment
        found: list[JsonObject] = []
        for page in range(1, 10_000):
            answer = self._call("GET", "/core/virtual-machines", params={**params, "page": page})
            instances: list[JsonObject] = answer.get("instances") or []
            found.extend(instances)
            if not instances or len(found) >= int(answer.get("count", 0)):
                break
        return found

    def delete_vm(self, vm_id: int | str) -> None:
        self._call("DELETE", f"/core/virtual-machines/{vm_id}")

    def set_vm_labels(self, vm_id: int | str, labels: list[str]) -> None:
        """Replace the VM's labels (the one VM field Hyperstack changes in place)."""
        self._call("PUT", f"/core/virtual-machines/{vm_id}/label", json={"labels": labels})

    def wait_for_vm(self, vm_id: int, deadline_s: float, interval_s: float, *, floating_ip: bool = False) -> JsonObject:
        """Poll until the VM is ACTIVE (and has its floating IP when one was asked for); return the instance."""
        give_up = time.monotonic() + deadline_s
        while True:
            instance = self.get_vm(vm_id)
            status = instance.get("status")
            if status == "ACTIVE" and (instance.get("floating_ip") or not floating_ip):
                return instance
            if status not in _PENDING and status != "ACTIVE":
                raise VmNotActive(f"Hyperstack VM {vm_id} went to {status} while being created", vm_id, status)
            if time.monotonic() >= give_up:
                state = f"{status} without its floating IP" if status == "ACTIVE" else status
                raise VmNotActive(
                    f"Hyperstack VM {vm_id} was still {state} after {deadline_s:g} s (deadline)", vm_id, status
                )
            time.sleep(interval_s)

    # -- security rules

    def add_rule(self, vm_id: int | str, rule: JsonObject) -> JsonObject:
        """Add a security rule; a rule that already exists raises `ConflictError`."""
        return self._object("security_rule", "POST", f"/core/virtual-machines/{vm_id}/sg-rules", json=rule)

    def delete_rule(self, vm_id: int | str, rule_id: int | str) -> None:
        self._call("DELETE", f"/core/virtual-machines/{vm_id}/sg-rules/{rule_id}")

    # -- keypairs

    def import_keypair(self, name: str, environment_name: str, public_key: str) -> JsonObject:
        payload = {"name": name, "environment_name": environment_name, "public_key": public_key}
        return self._object("keypair", "POST", "/core/keypairs", json=payload)

    def delete_keypair(self, keypair_id: int | str) -> None:
        self._call("DELETE", f"/core/keypair/{keypair_id}")

    # -- transport

    def _object(self, key: str, method: str, path: str, **kwargs: Any) -> JsonObject:
        """The object under `key` in the answer, which must carry an `id`."""
        found = self._call(method, path, **kwargs).get(key)
        if not isinstance(found, dict) or "id" not in found:
            raise HyperstackApiError(f"Hyperstack {method} {path} answered without {key}.id")
        return found

    def _call(self, method: str, path: str, **kwargs: Any) -> JsonObject:
        what = f"Hyperstack {method} {path}"
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise HyperstackApiError(f"{what} failed: {type(e).__name__}: {e}") from e
        if response.is_success:
            try:
                body = response.json() if response.content else {}
            except ValueError as e:
                raise HyperstackApiError(f"{what} answered {response.status_code} with a body that is not JSON") from e
            if not isinstance(body, dict):
                raise HyperstackApiError(f"{what} answered {response.status_code} with a body that is not an object")
            return body
        raise _error(what, response)


def _error(what: str, response: httpx.Response) -> HyperstackApiError:
    status = response.status_code
    message = f"{what} failed with {status}: {_api_message(response)}"
    if status in (401, 403):
        message += " (check HYPERSTACK_API_KEY)"
    kind = {404: NotFoundError, 409: ConflictError}.get(status, HyperstackApiError)
    return kind(message, status)


def _api_message(response: httpx.Response) -> str:
    """The API's own `message` when it sent one, else the start of the body, on one line."""
    try:
        body = response.json()
    except ValueError:
        body = None
    text = str(body["message"]) if isinstance(body, dict) and body.get("message") else response.text
    return " ".join(text.split())[:300] or response.reason_phrase
