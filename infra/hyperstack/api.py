"""A small synchronous client for the Hyperstack REST calls the backend needs: VMs, security rules, and deleting
the keypairs of older stacks.

A call that may succeed when sent again is retried with exponential backoff (`may_retry` says when: never a
POST that may have been carried out). Every failure leaves as a `BackendError` with a one-line message:

    BackendError (infra.vm)
     ├── HyperstackApiError   a call failed: `status` is the HTTP status (None when no answer came back)
     │    ├── NotFoundError   404: the thing is gone (deletes treat it as done)
     │    └── ConflictError   409: e.g. a security rule that already exists
     ├── VmNotActive          a new VM went to ERROR (or elsewhere), or was not ACTIVE by the deadline
     └── WaitCancelled        the wait for a new VM was cancelled (a shutdown)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception, retry_if_result, wait_exponential

from infra.vm import BackendError

log = logging.getLogger(__name__)

JsonObject = dict[str, Any]

DEFAULT_BASE_URL = "https://infrahub-api.nexgencloud.com/v1"

_PENDING = frozenset({"CREATING", "BUILD"})
"""A new VM moves through these on its way to ACTIVE (or ERROR)."""

IDEMPOTENT = frozenset({"GET", "PUT", "DELETE"})
"""Methods whose second sending does no more than the first: retried on any transient failure."""
REFUSED = frozenset({429, 503})
"""Statuses that say the request was turned away, not carried out: any method may be sent again."""
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
"""Transport errors raised before the request left this process: any method may be sent again."""
_HOPELESS = (httpx.UnsupportedProtocol, httpx.LocalProtocolError)
"""Transport errors of our own making (a bad base URL, a malformed request) that no retry cures."""
RETRY_AFTER_CAP_S = 30.0
"""The longest wait a `Retry-After` header gets from this client."""


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


class WaitCancelled(BackendError):
    pass


def may_retry(method: str, outcome: httpx.Response | BaseException) -> bool:
    """Whether sending `method` again after this answer (or transport error) is safe and may help.

    A POST creates something and Hyperstack has no idempotency key: it is sent again only when it surely was
    not carried out (refused with 429 or 503, or never sent). After a read timeout or a 500, 502 or 504 it may
    have been, and a second VM costs money. GET, PUT and DELETE are also retried on those, and on any 5xx.
    """
    if isinstance(outcome, httpx.Response):
        status = outcome.status_code
        return status in REFUSED or (method in IDEMPOTENT and status >= 500)
    if isinstance(outcome, _NOT_SENT):
        return True
    return method in IDEMPOTENT and isinstance(outcome, httpx.TransportError) and not isinstance(outcome, _HOPELESS)


def retry_after_s(response: httpx.Response) -> float | None:
    """The answer's `Retry-After` in seconds, at most `RETRY_AFTER_CAP_S`; None when absent or not in seconds."""
    value = response.headers.get("retry-after", "").strip()
    return min(float(value), RETRY_AFTER_CAP_S) if value.isascii() and value.isdigit() else None


class HyperstackClient:
    """One client per unit of work (`with HyperstackClient(...) as c:`); `transport` is the seam for tests.

    A call is tried at most `max_attempts` times, and not retried once the next wait would end more than
    `max_retry_s` after its first try. Waits double from `backoff_s` (1, 2, 4, 8 s: Hyperstack's own advice) unless
    the answer says how long in `Retry-After`. `sleep` spends a wait and `clock` reads the time (in seconds) that
    `max_retry_s` is measured on: tests pass a fake pair, so that no wait is slept.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        *,
        max_attempts: int = 5,
        max_retry_s: float = 60.0,
        backoff_s: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"api_key": api_key, "accept": "application/json"},
            timeout=timeout,
            transport=transport,
        )
        self._max_attempts = max_attempts
        self._max_retry_s = max_retry_s
        self._backoff = wait_exponential(multiplier=backoff_s)
        self._sleep = sleep
        self._clock = clock

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

    def wait_for_vm(
        self,
        vm_id: int,
        deadline_s: float,
        interval_s: float,
        *,
        floating_ip: bool = False,
        cancel: threading.Event | None = None,
    ) -> JsonObject:
        """Poll until the VM is ACTIVE (and has its floating IP when one was asked for); return the instance.

        Gives up with `VmNotActive` at the first poll after `deadline_s` (a poll's own retries may take longer).
        `cancel`, once set (a shutdown), ends the wait at the next pause between polls with `WaitCancelled`.
        """
        give_up = time.monotonic() + deadline_s
        pause = cancel or threading.Event()  # never set: a plain sleep
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
            if pause.wait(max(0.0, min(interval_s, give_up - time.monotonic()))):
                raise WaitCancelled(f"the wait for Hyperstack VM {vm_id} (still {status}) was cancelled")

    # -- security rules

    def add_rule(self, vm_id: int | str, rule: JsonObject) -> JsonObject:
        """Add a security rule; a rule that already exists raises `ConflictError`."""
        return self._object("security_rule", "POST", f"/core/virtual-machines/{vm_id}/sg-rules", json=rule)

    def delete_rule(self, vm_id: int | str, rule_id: int | str) -> None:
        self._call("DELETE", f"/core/virtual-machines/{vm_id}/sg-rules/{rule_id}")

    # -- keypairs

    def delete_keypair(self, keypair_id: int | str) -> None:
        """Used only for the per-replica keypairs of older stacks (see `provider.KeypairProvider`)."""
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
        retrying = self._retrying(method, what)
        try:
            response = retrying(self._http.request, method, path, **kwargs)
        except httpx.HTTPError as e:
            raise HyperstackApiError(f"{what} failed{_after(retrying)}: {type(e).__name__}: {e}") from e
        if response.is_success:
            try:
                body = response.json() if response.content else {}
            except ValueError as e:
                raise HyperstackApiError(f"{what} answered {response.status_code} with a body that is not JSON") from e
            if not isinstance(body, dict):
                raise HyperstackApiError(f"{what} answered {response.status_code} with a body that is not an object")
            return body
        raise _error(what, response, _after(retrying))

    def _retrying(self, method: str, what: str) -> Retrying:
        """The retry policy of one call; when it gives up, the last answer or transport error is the call's."""
        started = self._clock()

        def stop(state: RetryCallState) -> bool:
            out_of_time = self._clock() - started + state.upcoming_sleep >= self._max_retry_s
            return state.attempt_number >= self._max_attempts or out_of_time

        def wait(state: RetryCallState) -> float:
            answer = _outcome(state)
            waited = retry_after_s(answer) if isinstance(answer, httpx.Response) else None
            return self._backoff(state) if waited is None else waited

        def before_sleep(state: RetryCallState) -> None:
            log.warning(
                "%s: %s; attempt %d of %d, retrying in %.1f s",
                what,
                _describe(_outcome(state)),
                state.attempt_number,
                self._max_attempts,
                state.upcoming_sleep,
            )

        return Retrying(
            retry=retry_if_exception(lambda e: may_retry(method, e)) | retry_if_result(lambda r: may_retry(method, r)),
            stop=stop,
            wait=wait,
            sleep=self._sleep,
            before_sleep=before_sleep,
            retry_error_callback=_last_outcome,
        )


def _outcome(state: RetryCallState) -> httpx.Response | BaseException:
    """What the attempt that just ended brought back: an answer or a transport error."""
    assert state.outcome is not None  # set before `wait` and `before_sleep` are called
    error = state.outcome.exception()
    if error is not None:
        return error
    answer: httpx.Response = state.outcome.result()
    return answer


def _last_outcome(state: RetryCallState) -> httpx.Response:
    """The last answer, or its transport error raised: what the call had when it stopped retrying."""
    outcome = _outcome(state)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _describe(outcome: httpx.Response | BaseException) -> str:
    if isinstance(outcome, httpx.Response):
        return f"answered {outcome.status_code}"
    return f"{type(outcome).__name__}: {outcome}"


def _after(retrying: Retrying) -> str:
    """The message's ` after N attempts` when the call was tried more than once, else nothing."""
    attempts = int(retrying.statistics.get("attempt_number", 1))
    return f" after {attempts} attempts" if attempts > 1 else ""


def _error(what: str, response: httpx.Response, after: str = "") -> HyperstackApiError:
    status = response.status_code
    message = f"{what} failed with {status}{after}: {_api_message(response)}"
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
