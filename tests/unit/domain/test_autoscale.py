"""The autoscaler's decisions over sequences of loads and times: bounds, delays, waking from zero, no flapping."""

from __future__ import annotations

from orchestrator.domain.autoscale import AutoscalePolicy, Autoscaler, Load

POLICY = AutoscalePolicy(
    min_replicas=1, max_replicas=5, target_waiting=2.0, scale_up_delay_s=30, scale_down_delay_s=300
)


def walk(policy: AutoscalePolicy, current: int, loads: list[tuple[float, Load | None]]) -> list[int]:
    """The count wanted after each (time, load), each decision applied as the next `current`."""
    scaler, counts = Autoscaler(), []
    for now, load in loads:
        current = scaler.decide(1, policy, current, load, now).desired
        counts.append(current)
    return counts


def test_bounds_come_first() -> None:
    scaler = Autoscaler()
    low = scaler.decide(1, POLICY, 0, None, 0.0)
    high = scaler.decide(1, POLICY, 9, Load(ready=9), 0.0)
    assert (low.desired, high.desired) == (1, 5)
    assert "outside [1, 5]" in low.reason


def test_without_a_load_report_nothing_moves() -> None:
    decision = Autoscaler().decide(1, POLICY, 3, None, 0.0)
    assert decision.desired == 3
    assert "no load report" in decision.reason


def test_waiting_above_target_adds_enough_replicas_after_the_delay_only() -> None:
    busy = Load(ready=2, running=16, waiting=9)  # 4.5 per replica > 2
    counts = walk(POLICY, 2, [(0, busy), (10, busy), (29, busy), (30, busy)])
    # 8 run on each when full: 3 replicas run 24 of the 25 and leave 1 waiting (under 2 each); 2 leave 9.
    assert counts == [2, 2, 2, 3]


def test_scale_up_is_capped_by_max_and_says_so() -> None:
    scaler = Autoscaler()
    flood = Load(ready=2, running=16, waiting=100)
    scaler.decide(1, POLICY, 2, flood, 0.0)
    first = scaler.decide(1, POLICY, 2, flood, 30.0)
    assert first.desired == 4  # ceil(116 / (8 + 2)) = 12, but at most twice as many at a time
    assert first.reason == "waiting 100.0 > 2 x 2 ready for 30 s: 4"
    scaler.decide(1, POLICY, 5, Load(ready=5, running=40, waiting=100), 31.0)
    at_max = scaler.decide(1, POLICY, 5, Load(ready=5, running=40, waiting=100), 70.0)
    assert at_max.desired == 5
    assert at_max.reason == "more than 2 waiting per READY replica: already at max 5"


def test_a_dip_under_the_target_restarts_the_scale_up_delay() -> None:
    busy, calm = Load(ready=2, running=16, waiting=15), Load(ready=2, running=16, waiting=1)
    counts = walk(POLICY, 2, [(0, busy), (20, calm), (25, busy), (50, busy), (55, busy)])
    assert counts == [2, 2, 2, 2, 4]  # above since 25: 30 s later, not at 30 or 50; ceil(31 / (8 + 2)) = 4


def test_one_burst_is_one_step_up_while_the_new_replicas_start() -> None:
    busy = Load(ready=2, running=16, waiting=16)
    scaler = Autoscaler()
    scaler.decide(1, POLICY, 2, busy, 0.0)
    assert scaler.decide(1, POLICY, 2, busy, 30.0).desired == 4  # ceil(32 / (8 + 2))
    # The two new replicas are starting: not READY, so the same waiting calls must not ask for more yet.
    assert scaler.decide(1, POLICY, 4, busy, 31.0).desired == 4
    assert scaler.decide(1, POLICY, 4, busy, 59.0).desired == 4
    held = scaler.decide(1, POLICY, 4, Load(ready=2, running=16, waiting=60), 200.0)  # a slow boot, a longer line
    assert (held.desired, held.reason) == (4, "2 starting: judged again once READY")
    # READY at last, and still too few: judged a whole delay after the last look while they started.
    still = Load(ready=4, running=32, waiting=40)
    assert scaler.decide(1, POLICY, 4, still, 210.0).desired == 4
    assert scaler.decide(1, POLICY, 4, still, 230.0).desired == 5  # ceil(72 / (8 + 2)) = 8, capped by max


def test_scale_down_by_one_after_the_delay_then_the_delay_again() -> None:
    steps = [(0, 4), (100, 4), (299, 4), (300, 4), (301, 3), (600, 3), (601, 3)]  # (time, ready)
    counts = walk(POLICY, 4, [(t, Load(ready=ready)) for t, ready in steps])
    assert counts == [4, 4, 4, 3, 3, 3, 2]  # the second delay runs from the first look after the move (301)


def test_never_below_min() -> None:
    counts = walk(POLICY, 1, [(t, Load(ready=1)) for t in (0, 300, 600, 900)])
    assert counts == [1, 1, 1, 1]


def test_no_flapping_once_a_full_replica_was_seen() -> None:
    """3 replicas run 8 calls each with 2 waiting: the autoscaler learns one runs 8 at once. The load then settles
    at 24 running and nothing waiting; removing one would leave 8 waiting for 2 (4 each > 2): it stays at 3."""
    scaler = Autoscaler()
    scaler.decide(1, POLICY, 3, Load(ready=3, running=24, waiting=2), 0.0)
    steady = Load(ready=3, running=24, waiting=0)
    decisions = [scaler.decide(1, POLICY, 3, steady, float(t)) for t in range(1, 2000, 10)]
    assert {d.desired for d in decisions} == {3}
    assert "steady" in decisions[-1].reason
    # Lighter (14 running): 2 replicas run 16 at once, so one fewer carries it and one goes after the delay.
    light = Load(ready=3, running=14, waiting=0)
    scaler.decide(1, POLICY, 3, light, 3000.0)
    assert scaler.decide(1, POLICY, 3, light, 3300.0).desired == 2


def test_a_day_of_alternating_load_moves_a_few_times_only() -> None:
    """Bursts of 20 s every minute never last the 30 s up-delay; the quiet 40 s never last the 300 s down-delay."""
    scaler, current, moves = Autoscaler(), 2, 0
    for t in range(0, 3600, 5):
        burst = t % 60 < 20
        load = Load(ready=current, running=8 * current, waiting=10 if burst else 0)
        desired = scaler.decide(1, POLICY, current, load, float(t)).desired
        moves += desired != current
        current = desired
    assert (current, moves) == (2, 0)


def test_waking_from_zero_at_once_on_an_unserved_call() -> None:
    policy = AutoscalePolicy(min_replicas=0, max_replicas=3, scale_up_delay_s=30, scale_down_delay_s=60)
    scaler = Autoscaler()
    assert scaler.decide(1, policy, 0, Load(ready=0), 0.0).desired == 0
    woken = scaler.decide(1, policy, 0, Load(ready=0, unserved=2), 1.0)
    assert woken.desired == 1
    assert woken.reason == "2 call(s) found no replica: waking from zero"
    queued = scaler.decide(1, policy, 0, Load(ready=0, waiting=3), 2.0)
    assert queued.desired == 1


def test_scale_to_zero_only_when_idle_for_the_delay() -> None:
    policy = AutoscalePolicy(min_replicas=0, max_replicas=3, scale_up_delay_s=30, scale_down_delay_s=60)
    idle, busy = Load(ready=1), Load(ready=1, running=1)
    counts = walk(policy, 1, [(0, idle), (30, busy), (40, idle), (99, idle), (100, idle)])
    assert counts == [1, 1, 1, 1, 0]


def test_no_ready_replica_yet_keeps_the_count() -> None:
    decision = Autoscaler().decide(1, POLICY, 3, Load(ready=0, waiting=40), 100.0)
    assert decision.desired == 3
    assert "no READY replica yet" in decision.reason


def test_deployments_are_kept_apart() -> None:
    scaler, busy = Autoscaler(), Load(ready=1, running=8, waiting=15)
    scaler.decide(1, POLICY, 1, busy, 0.0)
    assert scaler.decide(2, POLICY, 1, busy, 30.0).desired == 1  # 2 was first seen above the target at 30
    assert scaler.decide(1, POLICY, 1, busy, 30.0).desired == 2
    scaler.forget(1)
    assert scaler.decide(1, POLICY, 1, busy, 31.0).desired == 1


def test_a_hold_says_the_same_words_while_the_situation_lasts() -> None:
    """A deployment's message is written when it changes: holds must not change with every number scraped."""
    scaler = Autoscaler()
    above = {
        scaler.decide(1, POLICY, 2, Load(ready=2, running=16, waiting=w), t).reason for t, w in enumerate((9, 11, 7))
    }
    assert above == {"more than 2 waiting per READY replica: more after 30 s of it"}
    scaler = Autoscaler()
    below = {scaler.decide(1, POLICY, 3, Load(ready=3, running=r), float(t)).reason for t, r in enumerate((0, 1, 2))}
    assert below == {"2 would do: fewer after 300 s of it"}
    steady = {scaler.decide(1, POLICY, 1, Load(ready=1, running=r), 10.0).reason for r in (3, 5)}
    assert steady == {"steady: at most 2 waiting per READY replica"}
