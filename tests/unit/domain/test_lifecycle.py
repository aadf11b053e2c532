"""The transition table over every pair of statuses, and the toolkit's derived vm_status."""

from __future__ import annotations

import itertools

import pytest

from orchestrator.domain.errors import InvalidTransition
from orchestrator.domain.lifecycle import (
    DELETABLE,
    REASON_DELETED,
    REASON_MODEL_DELETED,
    TRANSITIONS,
    ReplicaStatus,
    can_move,
    check_move,
    vm_status,
)

S = ReplicaStatus

# Written out by hand from the lifecycle in docs/architecture.md, independently of the table under test.
ALLOWED = {
    (S.PENDING, S.PROVISIONING),
    (S.PENDING, S.STARTING),
    (S.PENDING, S.DRAINING),
    (S.PENDING, S.TERMINATING),
    (S.PROVISIONING, S.BOOTSTRAPPING),
    (S.PROVISIONING, S.DRAINING),
    (S.PROVISIONING, S.TERMINATING),
    (S.BOOTSTRAPPING, S.STARTING),
    (S.BOOTSTRAPPING, S.DRAINING),
    (S.BOOTSTRAPPING, S.TERMINATING),
    (S.STARTING, S.SECURING),
    (S.STARTING, S.READY),
    (S.STARTING, S.DRAINING),
    (S.STARTING, S.TERMINATING),
    (S.SECURING, S.READY),
    (S.SECURING, S.DRAINING),
    (S.SECURING, S.TERMINATING),
    (S.READY, S.UNHEALTHY),
    (S.READY, S.DRAINING),
    (S.UNHEALTHY, S.READY),
    (S.UNHEALTHY, S.STARTING),
    (S.UNHEALTHY, S.DRAINING),
    (S.UNHEALTHY, S.TERMINATING),
    (S.DRAINING, S.TERMINATING),
    (S.TERMINATING, S.TERMINATED),
}


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(S, S)), ids=lambda s: s.value)
def test_every_pair(src: ReplicaStatus, dst: ReplicaStatus) -> None:
    expected = (src, dst) in ALLOWED
    assert can_move(src, dst) is expected
    if expected:
        check_move(src, dst)
    else:
        with pytest.raises(InvalidTransition):
            check_move(src, dst)


def test_table_covers_every_status_and_terminated_is_final() -> None:
    assert set(TRANSITIONS) == set(S)
    assert TRANSITIONS[S.TERMINATED] == frozenset()


def test_every_live_status_can_be_deleted_and_every_path_ends_terminated() -> None:
    assert frozenset({S.DRAINING, S.TERMINATING, S.TERMINATED}).isdisjoint(DELETABLE)
    for status in S:
        seen, frontier = {status}, [status]
        while frontier:
            for nxt in TRANSITIONS[frontier.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    frontier.append(nxt)
        assert S.TERMINATED in seen


@pytest.mark.parametrize(
    ("status", "reason", "expected"),
    [
        (S.READY, None, "SUCCESS"),
        (S.TERMINATED, "provisioning_failed", "FAILED"),
        (S.TERMINATED, "never_ready", "FAILED"),
        (S.TERMINATED, REASON_DELETED, "PENDING"),
        (S.TERMINATED, REASON_MODEL_DELETED, "PENDING"),
        *[(s, None, "PENDING") for s in S if s not in (S.READY, S.TERMINATED)],
    ],
)
def test_vm_status(status: ReplicaStatus, reason: str | None, expected: str) -> None:
    assert vm_status(status, reason) == expected
