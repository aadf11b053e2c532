"""Fleet simulation: a day of load replayed against the autoscaler's own decision code, in compressed time.

    .venv/bin/python scripts/fleet_sim.py [--seed 7] [--day-hours 24] [--json]

The load is a diurnal curve (a trough at 04:00, a peak at 14:00) with bursts at random times (seeded), as Poisson
arrivals per step. Each replica runs `--capacity` calls at once (vLLM's max_num_seqs), each call for `--service-s`;
calls past the READY replicas' room wait in one line, first come first served. Every `--decide-every-s` the
autoscaler (`orchestrator.domain.autoscale.Autoscaler.decide`, unchanged) reads what vLLM's `/metrics` would report
(running, waiting) and sets the replicas wanted; a new replica is READY `--boot-s` after it is asked for (a GPU VM
and its weights), a removed one is paid until its calls end. The same day is then served by a fixed fleet sized
for its busiest minute, for comparison.

Reported: GPU-hours (a replica is one GPU, paid from its request to its end), the time calls waited for room
(mean, p99, max), the share of calls that waited, and the scale events.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from orchestrator.domain.autoscale import AutoscalePolicy, Autoscaler, Load


@dataclass(frozen=True)
class Day:
    seed: int = 7
    day_hours: float = 24.0
    """The length of the simulated day: its curve is squeezed into it (a short day for a quick test)."""
    trough_rps: float = 2.0
    peak_rps: float = 24.0
    bursts: int = 6
    burst_factor: float = 2.0
    """A burst multiplies the curve's rate by up to this (uniformly from 1.3)."""
    burst_minutes: tuple[float, float] = (5.0, 20.0)
    step_s: float = 1.0


@dataclass(frozen=True)
class Fleet:
    capacity: int = 32
    """Calls one replica runs at once (vLLM's max_num_seqs)."""
    service_s: float = 12.0
    """How long one call runs (its tokens at the engine's pace)."""
    boot_s: float = 240.0
    decide_every_s: float = 15.0


@dataclass
class Outcome:
    calls: int = 0
    gpu_hours: float = 0.0
    peak_replicas: int = 0
    scale_ups: int = 0
    scale_downs: int = 0
    waited: int = 0
    wait_mean_s: float = 0.0
    wait_p99_s: float = 0.0
    wait_max_s: float = 0.0
    _waits: dict[float, int] = field(default_factory=dict, repr=False)

    def started(self, count: int, wait: float) -> None:
        self._waits[wait] = self._waits.get(wait, 0) + count

    def close(self) -> None:
        total = sum(self._waits.values())
        self.calls = total
        self.waited = sum(n for w, n in self._waits.items() if w > 0)
        self.wait_mean_s = sum(w * n for w, n in self._waits.items()) / total if total else 0.0
        self.wait_max_s = max(self._waits, default=0.0)
        seen, target = 0, 0.99 * total
        for w in sorted(self._waits):
            seen += self._waits[w]
            if seen >= target:
                self.wait_p99_s = w
                break

    def report(self) -> dict[str, Any]:
        """The outcome's figures, without the waits they were drawn from."""
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


def rates(day: Day) -> list[float]:
    """Calls per second at each step: the diurnal curve, with the day's bursts laid on it."""
    rng = random.Random(day.seed)
    steps = int(day.day_hours * 3600 / day.step_s)
    scale = day.day_hours / 24.0  # a short day squeezes the 24 h curve (and its bursts) into its length
    curve = [
        day.trough_rps
        + (day.peak_rps - day.trough_rps) * (1 - math.cos(2 * math.pi * ((i * day.step_s / scale / 3600) - 4) / 20)) / 2
        if 4 <= (i * day.step_s / scale / 3600) <= 24
        else day.trough_rps
        for i in range(steps)
    ]
    for _ in range(day.bursts):
        start = rng.randrange(steps)
        length = int(rng.uniform(*day.burst_minutes) * 60 * scale / day.step_s) + 1
        factor = rng.uniform(1.3, day.burst_factor)
        for i in range(start, min(steps, start + length)):
            curve[i] *= factor
    return curve


def arrivals(rate_per_step: list[float], seed: int) -> list[int]:
    """Poisson arrivals per step (a normal approximation past 30 per step)."""
    rng = random.Random(seed + 1)
    out = []
    for lam in rate_per_step:
        if lam < 30:
            n, p, limit = 0, 1.0, math.exp(-lam)
            while (p := p * rng.random()) > limit:
                n += 1
            out.append(n)
        else:
            out.append(max(0, round(rng.gauss(lam, math.sqrt(lam)))))
    return out


def fixed_size(calls: list[int], day: Day, fleet: Fleet) -> int:
    """Replicas that carry the busiest minute with no call waiting: its rate times a call's length, per replica."""
    window = max(1, int(60 / day.step_s))
    busiest = max(sum(calls[i : i + window]) for i in range(max(1, len(calls) - window + 1))) / (window * day.step_s)
    return max(1, math.ceil(busiest * fleet.service_s / fleet.capacity))


class _Serving:
    """The fleet during the day: replicas READY and starting, the calls running and the line of those waiting."""

    def __init__(self, fleet: Fleet, ready: int, out: Outcome) -> None:
        self.fleet = fleet
        self.ready = ready
        self.out = out
        self.booting: deque[float] = deque()  # READY times of the replicas asked for
        self.line: deque[list[float]] = deque()  # [arrival time, calls] cohorts, first come first
        self.running: deque[tuple[float, int]] = deque()  # (end time, calls): one service time, so ends in order
        self.in_flight = 0
        self.paid_s = 0.0

    @property
    def wanted(self) -> int:
        return self.ready + len(self.booting)

    def tick(self, now: float, new: int) -> None:
        """Replicas that became READY, calls that ended, the step's arrivals, and the line into the room left."""
        while self.booting and self.booting[0] <= now:
            self.booting.popleft()
            self.ready += 1
        while self.running and self.running[0][0] <= now:
            self.in_flight -= self.running.popleft()[1]
        if new:
            self.line.append([now, float(new)])
        room = self.ready * self.fleet.capacity - self.in_flight
        while self.line and room > 0:
            cohort = self.line[0]
            taken = int(min(room, cohort[1]))
            self.out.started(taken, now - cohort[0])
            self.running.append((now + self.fleet.service_s, taken))
            self.in_flight += taken
            room -= taken
            cohort[1] -= taken
            if cohort[1] <= 0:
                self.line.popleft()

    def load(self, unserved: int) -> Load:
        """What the engines' `/metrics` would say (and the calls that found no replica)."""
        waiting = sum(c[1] for c in self.line)
        return Load(ready=self.ready, running=self.in_flight, waiting=waiting, unserved=unserved)

    def scale(self, now: float, desired: int) -> None:
        if desired > self.wanted:
            self.out.scale_ups += 1
            self.booting.extend([now + self.fleet.boot_s] * (desired - self.wanted))
        elif desired < self.wanted:
            self.out.scale_downs += 1
            for _ in range(self.wanted - desired):
                if self.booting:
                    self.booting.pop()  # the last asked for goes first: it serves nothing yet
                else:
                    self.ready -= 1
                    self.paid_s += self.fleet.service_s  # drained: paid until its last call ends


def simulate(calls: list[int], day: Day, fleet: Fleet, policy: AutoscalePolicy | None, fixed: int) -> Outcome:
    """One day served by the autoscaler under `policy`, or by `fixed` replicas when `policy` is None."""
    out, scaler = Outcome(), Autoscaler()
    serving = _Serving(fleet, fixed if policy is None else policy.min_replicas, out)
    next_decision, unserved = 0.0, 0
    for i, new in enumerate(calls):
        now = i * day.step_s
        unserved += new if serving.ready == 0 else 0
        serving.tick(now, new)
        if policy is not None and now >= next_decision:
            next_decision = now + fleet.decide_every_s
            serving.scale(now, scaler.decide(1, policy, serving.wanted, serving.load(unserved), now).desired)
            unserved = 0
        serving.paid_s += serving.wanted * day.step_s
        out.peak_replicas = max(out.peak_replicas, serving.wanted)
    for cohort in serving.line:  # the day is over: what still waits has waited until then
        out.started(int(cohort[1]), len(calls) * day.step_s - cohort[0])
    out.gpu_hours = serving.paid_s / 3600
    out.close()
    return out


def run(day: Day, fleet: Fleet, policy: AutoscalePolicy) -> dict[str, Any]:
    per_step = [r * day.step_s for r in rates(day)]
    calls = arrivals(per_step, day.seed)
    fixed = fixed_size(calls, day, fleet)
    auto = simulate(calls, day, fleet, policy, fixed)
    peak = simulate(calls, day, fleet, None, fixed)
    return {
        "day": asdict(day),
        "fleet": asdict(fleet),
        "policy": asdict(policy),
        "fixed_replicas": fixed,
        "autoscaled": auto.report(),
        "fixed_at_peak": peak.report(),
    }


def table(report: dict[str, Any]) -> str:
    auto, fixed, policy = report["autoscaled"], report["fixed_at_peak"], report["policy"]
    rows = [
        ("replicas", f"{policy['min_replicas']}-{auto['peak_replicas']}", f"{report['fixed_replicas']}"),
        ("GPU-hours", f"{auto['gpu_hours']:.1f}", f"{fixed['gpu_hours']:.1f}"),
        ("calls", f"{auto['calls']:,}", f"{fixed['calls']:,}"),
        ("calls that waited for room", _share(auto), _share(fixed)),
        ("wait mean / p99 / max (s)", _waits(auto), _waits(fixed)),
        ("scale events (up / down)", f"{auto['scale_ups']} / {auto['scale_downs']}", "0 / 0"),
    ]
    lines = ["| | autoscaled | fixed at peak |", "|---|---|---|"]
    lines += [f"| {name} | {a} | {f} |" for name, a, f in rows]
    return "\n".join(lines)


def _share(o: dict[str, Any]) -> str:
    return f"{o['waited'] / max(1, o['calls']):.2%} ({o['waited']:,})"


def _waits(o: dict[str, Any]) -> str:
    return f"{o['wait_mean_s']:.2f} / {o['wait_p99_s']:.0f} / {o['wait_max_s']:.0f}"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=Day.seed)
    p.add_argument("--day-hours", type=float, default=Day.day_hours)
    p.add_argument("--peak-rps", type=float, default=Day.peak_rps)
    p.add_argument("--trough-rps", type=float, default=Day.trough_rps)
    p.add_argument("--bursts", type=int, default=Day.bursts)
    p.add_argument("--capacity", type=int, default=Fleet.capacity)
    p.add_argument("--service-s", type=float, default=Fleet.service_s)
    p.add_argument("--boot-s", type=float, default=Fleet.boot_s)
    p.add_argument("--decide-every-s", type=float, default=Fleet.decide_every_s)
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=64)
    p.add_argument("--target-waiting", type=float, default=2.0)
    p.add_argument("--scale-up-delay-s", type=float, default=30.0)
    p.add_argument("--scale-down-delay-s", type=float, default=300.0)
    p.add_argument("--json", action="store_true", help="The whole report as JSON instead of the table.")
    a = p.parse_args(argv)
    day = Day(a.seed, a.day_hours, a.trough_rps, a.peak_rps, a.bursts)
    fleet = Fleet(a.capacity, a.service_s, a.boot_s, a.decide_every_s)
    policy = AutoscalePolicy(a.min_replicas, a.max_replicas, a.target_waiting, a.scale_up_delay_s, a.scale_down_delay_s)
    report = run(day, fleet, policy)
    print(json.dumps(report, indent=2) if a.json else table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
