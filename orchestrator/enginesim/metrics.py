"""The engine simulator's vLLM metrics: its counters, latency histograms and their Prometheus text."""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Sequence
from typing import Final

_KV_CACHE_SEQUENCES: Final = 8  # notional KV cache size, in full-length sequences, behind kv_cache_usage_perc
_TTFT_BUCKETS: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_E2E_BUCKETS: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Histogram:
    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # le is inclusive
        self.sum += value
        self.count += 1

    def render(self, name: str, help_: str, labels: str) -> list[str]:
        lines = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        cumulative = itertools.accumulate(self.counts[:-1])
        lines += (f'{name}_bucket{{{labels},le="{b}"}} {n}' for b, n in zip(self.bounds, cumulative, strict=True))
        lines += [
            f'{name}_bucket{{{labels},le="+Inf"}} {self.count}',
            f"{name}_sum{{{labels}}} {self.sum}",
            f"{name}_count{{{labels}}} {self.count}",
        ]
        return lines


class EngineMetrics:
    """Prompt tokens count once admitted (prefilled, for vLLM); generation tokens only for finished requests."""

    def __init__(self, model: str, max_model_len: int) -> None:
        self.labels = f'model_name="{_escape_label(model)}"'
        self.kv_capacity = max_model_len * _KV_CACHE_SEQUENCES
        self.running = 0
        self.waiting = 0
        self.running_tokens = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.success_total = 0
        self.ttft = _Histogram(_TTFT_BUCKETS)
        self.e2e = _Histogram(_E2E_BUCKETS)

    def admitted(self, prompt: int, completion: int) -> None:
        self.running += 1
        self.running_tokens += prompt + completion
        self.prompt_tokens_total += prompt

    def left(self, prompt: int, completion: int) -> None:
        self.running -= 1
        self.running_tokens -= prompt + completion

    def succeeded(self, completion: int, ttft: float, start: float) -> None:
        self.generation_tokens_total += completion
        self.success_total += 1
        self.ttft.observe(ttft)
        self.e2e.observe(time.perf_counter() - start)

    def render(self) -> bytes:
        labels = self.labels
        kv_usage = min(1.0, self.running_tokens / self.kv_capacity)
        lines: list[str] = []
        for kind, name, help_, value in (
            ("gauge", "vllm:num_requests_running", "Requests in model execution batches.", self.running),
            ("gauge", "vllm:num_requests_waiting", "Requests waiting to be processed.", self.waiting),
            ("gauge", "vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.", kv_usage),
            ("counter", "vllm:prompt_tokens_total", "Prefill tokens processed.", self.prompt_tokens_total),
            ("counter", "vllm:generation_tokens_total", "Generation tokens processed.", self.generation_tokens_total),
        ):
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name}{{{labels}}} {float(value)}"]
        name = "vllm:request_success_total"
        lines += [
            f"# HELP {name} Successfully processed requests.",
            f"# TYPE {name} counter",
            f'{name}{{finished_reason="length",{labels}}} {float(self.success_total)}',
        ]
        lines += self.ttft.render("vllm:time_to_first_token_seconds", "Time to first token.", labels)
        lines += self.e2e.render("vllm:e2e_request_latency_seconds", "End to end request latency.", labels)
        return ("\n".join(lines) + "\n").encode()
