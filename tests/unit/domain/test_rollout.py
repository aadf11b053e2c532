"""The deployment keeper's plan: what it makes, drains and reports for each state of a deployment's replicas."""

from __future__ import annotations

from orchestrator.domain.lifecycle import ReplicaStatus
from orchestrator.domain.rollout import DeploymentStatus, Drain, Member, Plan, Target, plan

S = ReplicaStatus
D = DeploymentStatus


def ready(i: int, gen: int = 1) -> Member:
    return Member(i, S.READY, gen, ever_ready=True)


def starting(i: int, gen: int = 1, status: S = S.STARTING) -> Member:
    return Member(i, status, gen)


def ended(
    i: int, gen: int = 1, reason: str = "never_ready", *, was_ready: bool = False, counted: bool = True
) -> Member:
    return Member(i, S.TERMINATED, gen, ever_ready=was_ready, termination_reason=reason, counted=counted)


def test_an_empty_deployment_makes_its_count() -> None:
    p = plan([], Target(generation=1, desired=3))
    assert (p.create, p.drain, p.status) == (3, (), D.SCALING)


def test_all_ready_is_steady_and_does_nothing() -> None:
    assert plan([ready(1), ready(2), ready(3)], Target(1, 3)) == Plan(0, (), D.STEADY, "3 of 3 replicas READY")


def test_replicas_still_starting_are_waited_for_not_made_again() -> None:
    p = plan([ready(1), starting(2), starting(3, status=S.PENDING)], Target(1, 3))
    assert (p.create, p.drain, p.status) == (0, (), D.SCALING)


def test_a_replica_killed_after_serving_is_replaced_and_is_no_failure() -> None:
    killed = ended(3, reason="unrecoverable", was_ready=True)
    p = plan([ready(1), ready(2), killed], Target(1, 3, max_failed_starts=1))
    assert (p.create, p.status) == (1, D.SCALING)


def test_draining_replicas_no_longer_count() -> None:
    p = plan([ready(1), ready(2), Member(3, S.DRAINING, 1, ever_ready=True)], Target(1, 3))
    assert p.create == 1


def test_surplus_drains_not_yet_ready_first_then_the_newest() -> None:
    members = [ready(1), ready(2), ready(3), starting(4), Member(5, S.UNHEALTHY, 1, ever_ready=True)]
    p = plan(members, Target(1, 2))
    assert p.drain == (Drain(4, "scaled_down"), Drain(5, "scaled_down"), Drain(3, "scaled_down"))
    assert p.create == 0


def test_a_never_ready_engine_is_replaced_until_the_limit_then_failing() -> None:
    target = Target(1, 3, max_failed_starts=3)
    assert plan([ready(1), ready(2), ended(3)], target).create == 1
    assert plan([ready(1), ready(2), ended(3), ended(4)], target).create == 1
    stopped = plan([ready(1), ready(2), ended(3), ended(4), ended(5)], target)
    assert (stopped.create, stopped.status) == (0, D.FAILING)
    assert stopped.message.startswith("3 replicas in a row ended without ever being READY (the last, replica 5: ")


def test_a_ready_replica_breaks_the_run_of_failures() -> None:
    members = [ended(1), ended(2), ready(3), ended(4), ended(5)]
    assert plan(members, Target(1, 3, max_failed_starts=3)).create == 2


def test_replicas_still_starting_do_not_break_the_run() -> None:
    members = [ended(1), starting(2), ended(3), ended(4)]
    assert plan(members, Target(1, 3, max_failed_starts=3)).status == D.FAILING


def test_an_admins_retry_forgets_the_earlier_failures() -> None:
    members = [ended(i, counted=False) for i in (1, 2, 3)]
    p = plan(members, Target(1, 2))
    assert (p.create, p.status) == (2, D.SCALING)


def test_replicas_drained_by_the_deployment_are_not_failures() -> None:
    members = [ended(1, reason="scaled_down"), ended(2, reason="deleted"), ended(3, reason="rolled")]
    assert plan(members, Target(1, 1, max_failed_starts=1)).create == 1


def test_a_roll_brings_up_the_surge_first_and_drains_nothing() -> None:
    p = plan([ready(1), ready(2), ready(3)], Target(generation=2, desired=3, max_surge=1))
    assert (p.create, p.drain, p.status) == (1, (), D.ROLLING)


def test_a_roll_waits_while_the_new_replica_is_not_ready() -> None:
    p = plan([ready(1), ready(2), ready(3), starting(4, gen=2)], Target(2, 3, max_surge=1))
    assert (p.create, p.drain) == (0, ())


def test_each_new_ready_replica_drains_one_old_one_and_the_next_is_made() -> None:
    p = plan([ready(1), ready(2), ready(3), ready(4, gen=2)], Target(2, 3, max_surge=1))
    assert p.drain == (Drain(1, "rolled"),)
    assert p.create == 1


def test_a_wider_surge_makes_more_at_once() -> None:
    assert plan([ready(1), ready(2), ready(3)], Target(2, 3, max_surge=2)).create == 2


def test_old_replicas_that_do_not_serve_are_rolled_first() -> None:
    members = [ready(1), Member(2, S.UNHEALTHY, 1, ever_ready=True), ready(3), ready(4, gen=2)]
    assert plan(members, Target(2, 3)).drain == (Drain(2, "rolled"),)


def test_the_roll_ends_steady_once_no_old_replica_is_left() -> None:
    members = [Member(1, S.DRAINING, 1, ever_ready=True), ready(4, gen=2), ready(5, gen=2), ready(6, gen=2)]
    assert plan(members, Target(2, 3)).status == D.STEADY


def test_a_new_replica_that_never_gets_ready_stops_the_roll_and_keeps_the_old_ones() -> None:
    members = [ready(1), ready(2), ready(3), ended(4, gen=2, reason="provision_failed"), starting(5, gen=2)]
    p = plan(members, Target(2, 3, max_surge=2))
    assert (p.create, p.drain, p.status) == (0, (Drain(5, "rollout_stopped"),), D.ROLLOUT_FAILED)
    assert p.message == (
        "replica 4 of generation 2 ended without ever being READY (provision_failed): the roll stopped, "
        "3 replicas of the previous template keep serving"
    )


def crashed(i: int, served_s: float, gen: int = 1) -> Member:
    """Ended `unrecoverable` `served_s` seconds after its first READY."""
    return Member(i, S.TERMINATED, gen, ever_ready=True, termination_reason="unrecoverable", served_s=served_s)


def test_engines_that_crash_soon_after_ready_count_as_failures_until_failing() -> None:
    target = Target(1, 2, max_failed_starts=3)
    assert plan([ready(1), crashed(2, 30), crashed(3, 45)], target).create == 1
    stopped = plan([ready(1), crashed(2, 30), crashed(3, 45), crashed(4, 599)], target)
    assert (stopped.create, stopped.status) == (0, D.FAILING)
    assert stopped.message == (
        "3 replicas in a row ended without ever being READY, or within 10 min of it (the last, replica 4: "
        "unrecoverable); no more are made until the template changes or an admin retries"
    )


def test_an_engine_that_served_long_enough_before_it_crashed_breaks_the_run() -> None:
    members = [crashed(1, 30), crashed(2, 30), crashed(3, 600), crashed(4, 30)]
    assert plan(members, Target(1, 1, max_failed_starts=2)).create == 1


def test_a_new_replica_that_crashes_soon_after_ready_stops_the_roll() -> None:
    members = [ready(1), ready(2), crashed(4, 42, gen=2)]
    p = plan(members, Target(2, 2))
    assert (p.create, p.status) == (0, D.ROLLOUT_FAILED)
    assert p.message.startswith("replica 4 of generation 2 ended 42 s after its first READY (unrecoverable): ")
