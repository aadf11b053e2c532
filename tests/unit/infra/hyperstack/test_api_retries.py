"""The REST client's retries and its cancellable wait, against the fake Hyperstack API (and a mock transport for
transport errors). Waits are recorded, never slept: the client's `sleep` and `clock` are a `FakeTime`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from infra.hyperstack.api import HyperstackApiError, HyperstackClient, NotFoundError, WaitCancelled
from tests.support.fake_hyperstack import FakeHyperstack, Scripted, running_fake_hyperstack

VMS = "/core/virtual-machines"
VM_BODY = {"name": "vm", "environment_name": "env", "flavor_name": "f", "key_name": "k", "count": 1}


@pytest.fixture
def fake() -> Iterator[FakeHyperstack]:
    with running_fake_hyperstack() as fake:
        fake.add_keypair_directly("k", "env")  # the keypair VM_BODY names
        yield fake


@dataclass
class FakeTime:
    """A clock that only moves when a wait is spent on it."""

    now: float = 0.0
    waits: list[float] = field(default_factory=list)
    """Every wait between two attempts, in seconds, in order."""

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def waits(fake_time: FakeTime) -> list[float]:
    return fake_time.waits


def client_of(base_url: str, api_key: str, fake_time: FakeTime, **options: Any) -> HyperstackClient:
    return HyperstackClient(base_url, api_key, timeout=5, sleep=fake_time.sleep, clock=fake_time.clock, **options)


@pytest.fixture
def client(fake: FakeHyperstack, fake_time: FakeTime) -> Iterator[HyperstackClient]:
    with client_of(fake.base_url, fake.api_key, fake_time) as c:
        yield c


@pytest.fixture
def vm_id(fake: FakeHyperstack, client: HyperstackClient) -> int:
    return int(client.create_vm(VM_BODY)["id"])


# -- answers


def test_a_get_refused_with_503_then_429_is_retried_with_backoff(
    fake: FakeHyperstack, client: HyperstackClient, waits: list[float], vm_id: int
) -> None:
    fake.script("GET", f"{VMS}/{vm_id}", Scripted(503), Scripted(429))

    assert client.get_vm(vm_id)["id"] == vm_id

    assert fake.vm_gets(vm_id) == 3
    assert waits == [1.0, 2.0]


def test_retry_after_in_seconds_is_honoured_and_capped(
    fake: FakeHyperstack, client: HyperstackClient, waits: list[float], vm_id: int
) -> None:
    fake.script(
        "GET",
        f"{VMS}/{vm_id}",
        Scripted(429, retry_after="3"),
        Scripted(503, retry_after="3600"),
        Scripted(503, retry_after="Wed, 21 Oct 2015 07:28:00 GMT"),  # not seconds: the backoff's own wait
    )

    client.get_vm(vm_id)

    assert waits == [3.0, 30.0, 4.0]


def test_a_get_gives_up_after_max_attempts_with_the_last_answer(
    fake: FakeHyperstack, client: HyperstackClient, waits: list[float], vm_id: int
) -> None:
    fake.script("GET", f"{VMS}/{vm_id}", *[Scripted(502)] * 4, Scripted(504))

    with pytest.raises(HyperstackApiError) as caught:
        client.get_vm(vm_id)

    assert caught.value.status == 504
    assert str(caught.value) == f"Hyperstack GET {VMS}/{vm_id} failed with 504 after 5 attempts: scripted 504"
    assert fake.vm_gets(vm_id) == 5
    assert waits == [1.0, 2.0, 4.0, 8.0]


def test_no_retry_would_end_after_max_retry_s(fake: FakeHyperstack, fake_time: FakeTime, vm_id: int) -> None:
    fake.script("GET", f"{VMS}/{vm_id}", Scripted(429, retry_after="3"), Scripted(429, retry_after="3"))

    with client_of(fake.base_url, fake.api_key, fake_time, max_retry_s=5) as c, pytest.raises(HyperstackApiError) as e:
        c.get_vm(vm_id)

    assert e.value.status == 429
    assert fake_time.waits == [3.0]  # a second wait of 3 s would end 6 s after the first try
    assert fake.vm_gets(vm_id) == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
def test_other_4xx_answers_are_not_retried(
    fake: FakeHyperstack, client: HyperstackClient, waits: list[float], vm_id: int, status: int
) -> None:
    fake.script("GET", f"{VMS}/{vm_id}", Scripted(status))

    with pytest.raises(HyperstackApiError) as caught:
        client.get_vm(vm_id)

    assert caught.value.status == status
    assert fake.vm_gets(vm_id) == 1
    assert waits == []


@pytest.mark.parametrize("status", [500, 502, 504])
def test_a_post_that_may_have_been_carried_out_is_not_retried(
    fake: FakeHyperstack, client: HyperstackClient, waits: list[float], status: int
) -> None:
    fake.script("POST", VMS, Scripted(status, carried_out=True))

    with pytest.raises(HyperstackApiError) as caught:
        client.create_vm(VM_BODY)

    assert caught.value.status == status
    assert fake.count("POST", VMS) == 1
    assert len(fake.vms) == 1  # the one VM the lost answer was about, not a second
    assert waits == []


def test_a_post_refused_with_429_or_503_is_retried(
    fake: FakeHyperstack, client: HyperstackClient, waits: list[float]
) -> None:
    fake.script("POST", VMS, Scripted(429, retry_after="1"), Scripted(503))

    created = client.create_vm(VM_BODY)

    assert list(fake.vms) == [created["id"]]
    assert fake.count("POST", VMS) == 3
    assert waits == [1.0, 2.0]


def test_rules_follow_the_post_policy(
    fake: FakeHyperstack, client: HyperstackClient, waits: list[float], vm_id: int
) -> None:
    rule: dict[str, Any] = {"direction": "ingress", "protocol": "tcp", "ethertype": "IPv4"}
    rule |= {"remote_ip_prefix": "198.51.100.0/24", "port_range_min": 8000, "port_range_max": 8000}
    fake.script("POST", f"{VMS}/{vm_id}/sg-rules", Scripted(503), Scripted(500, carried_out=True))

    with pytest.raises(HyperstackApiError, match="failed with 500 after 2 attempts"):
        client.add_rule(vm_id, rule)

    assert fake.count("POST", f"{VMS}/{vm_id}/sg-rules") == 2
    assert len(fake.vms[vm_id]["security_rules"]) == 1
    assert waits == [1.0]


def test_put_and_delete_are_retried_on_5xx(
    fake: FakeHyperstack, client: HyperstackClient, waits: list[float], vm_id: int
) -> None:
    fake.script("PUT", f"{VMS}/{vm_id}/label", Scripted(500), Scripted(502, carried_out=True))
    fake.script("DELETE", f"{VMS}/{vm_id}", Scripted(504))

    client.set_vm_labels(vm_id, ["orchestrator-replica=7"])
    client.delete_vm(vm_id)

    assert fake.count("PUT", f"{VMS}/{vm_id}/label") == 3
    assert fake.count("DELETE", f"{VMS}/{vm_id}") == 2
    assert fake.vms == {}
    assert waits == [1.0, 2.0, 1.0]


def test_a_delete_carried_out_before_its_500_ends_in_404(
    fake: FakeHyperstack, client: HyperstackClient, vm_id: int
) -> None:
    fake.script("DELETE", f"{VMS}/{vm_id}", Scripted(500, carried_out=True))

    with pytest.raises(NotFoundError):  # what every caller of a delete takes as done
        client.delete_vm(vm_id)

    assert fake.count("DELETE", f"{VMS}/{vm_id}") == 2


# -- transport errors


def transport_failing(*errors: type[httpx.TransportError]) -> tuple[httpx.MockTransport, list[str]]:
    """A transport whose first requests raise `errors`, one each, then answer as Hyperstack would; and the list of
    the methods it saw."""
    seen: list[str] = []
    pending = list(errors)

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        if pending:
            raise pending.pop(0)("scripted", request=request)
        body = {"instances": [{"id": 1, "status": "CREATING"}]} if request.method == "POST" else {}
        return httpx.Response(200, json={"status": True, "message": "ok", "instance": {"id": 1}, **body})

    return httpx.MockTransport(answer), seen


CALLS: dict[str, Callable[[HyperstackClient], Any]] = {
    "GET": lambda c: c.get_vm(1),
    "PUT": lambda c: c.set_vm_labels(1, []),
    "DELETE": lambda c: c.delete_vm(1),
    "POST": lambda c: c.create_vm(VM_BODY),
}


@pytest.mark.parametrize(
    ("method", "error", "sent"),
    [
        ("POST", httpx.ConnectError, 2),  # never sent: safe to send
        ("POST", httpx.ConnectTimeout, 2),
        ("POST", httpx.PoolTimeout, 2),
        ("POST", httpx.ReadTimeout, 1),  # sent, answer lost: it may have made a VM
        ("POST", httpx.RemoteProtocolError, 1),
        ("GET", httpx.ReadTimeout, 2),
        ("GET", httpx.RemoteProtocolError, 2),
        ("PUT", httpx.ReadError, 2),
        ("DELETE", httpx.WriteTimeout, 2),
        ("GET", httpx.UnsupportedProtocol, 1),  # a bad base URL: no retry cures it
    ],
)
def test_transport_errors_are_retried_when_sending_again_is_safe(
    method: str, error: type[httpx.TransportError], sent: int
) -> None:
    transport, seen = transport_failing(error)
    fake_time = FakeTime()

    with client_of("http://hyperstack.test/v1", "key", fake_time, transport=transport) as c:
        if sent == 1:
            with pytest.raises(HyperstackApiError, match=f": {error.__name__}: scripted$") as caught:
                CALLS[method](c)
            assert caught.value.status is None
        else:
            CALLS[method](c)

    assert seen == [method] * sent
    assert len(fake_time.waits) == sent - 1


# -- the wait for a new VM


def test_a_cancelled_wait_ends_at_once_instead_of_at_the_deadline(
    fake: FakeHyperstack, client: HyperstackClient, vm_id: int
) -> None:
    fake.gets_per_status = 1000  # stays CREATING
    cancel = threading.Event()
    outcome: list[BaseException] = []

    def wait() -> None:
        try:
            client.wait_for_vm(vm_id, deadline_s=600, interval_s=600, cancel=cancel)
        except BaseException as e:  # noqa: BLE001 (handed to the test's thread)
            outcome.append(e)

    waiting = threading.Thread(target=wait, daemon=True)
    waiting.start()
    give_up = time.monotonic() + 10
    while fake.vm_gets(vm_id) < 1:  # the first poll is in: the wait then pauses for 600 s
        assert time.monotonic() < give_up, "the wait never polled"
        time.sleep(0.001)
    cancel.set()
    waiting.join(timeout=10)

    assert not waiting.is_alive()
    [error] = outcome
    assert isinstance(error, WaitCancelled)
    assert str(error) == f"the wait for Hyperstack VM {vm_id} (still CREATING) was cancelled"
    assert fake.vm_gets(vm_id) == 1
