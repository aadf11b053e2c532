"""Reading vLLM's `/metrics` page: the counts the autoscaler uses, per model, summed over engine cores."""

from __future__ import annotations

import pytest

from orchestrator.fleet.engine_load import ScrapeFailed, parse_metrics

VLLM_PAGE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 3.0
vllm:num_requests_running{engine="1",model_name="llama"} 4.0
vllm:num_requests_running{engine="0",model_name="other"} 50.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama"} 2.0
vllm:num_requests_waiting{engine="1",model_name="llama"} 5.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="llama"} 0.7
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="llama"} 1234.0
"""


def test_counts_are_summed_over_engine_cores_and_the_kv_cache_averaged() -> None:
    running, waiting, kv = parse_metrics(VLLM_PAGE, "llama")
    assert (running, waiting) == (7.0, 7.0)  # the other model's 50 are not this one's
    assert kv == pytest.approx(0.6)


def test_older_vllm_names_its_kv_cache_gpu_cache_and_labels_are_optional() -> None:
    page = (
        "vllm:num_requests_running 1\nvllm:num_requests_waiting 0\n"
        "# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc 0.25\n"
    )
    assert parse_metrics(page, "llama") == (1.0, 0.0, 0.25)


@pytest.mark.parametrize(
    ("page", "says"),
    [
        ("<html>login</html>\n", "not Prometheus text"),
        ("process_cpu_seconds_total 3\n", "no vllm:num_requests_running"),
        ('vllm:num_requests_running{model_name="x"} 1\nvllm:num_requests_waiting{model_name="x"} 1\n', "'llama'"),
    ],
)
def test_a_page_that_is_no_vllm_page_fails_with_why(page: str, says: str) -> None:
    with pytest.raises(ScrapeFailed, match=says):
        parse_metrics(page, "llama")
