"""What the gateway reads of a body to bound a call's worst case: its outputs (n, and a completion's prompts) and
the parts of its messages whose tokens its bytes do not bound."""

from __future__ import annotations

import json

import pytest

from api.gateway.bodies import COMPLETION_DEFAULT_MAX_TOKENS, parse


def parsed(kind: str, **body: object) -> tuple[int | None, int, int]:
    p = parse(json.dumps({"model": "m", **body}).encode(), kind, path_model=None, toolkit=False)  # type: ignore[arg-type]
    return p.max_tokens, p.outputs, p.media


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"prompt": "hi", "max_tokens": 100}, (100, 1, 0)),
        ({"prompt": ["a", "b", "c"], "max_tokens": 100, "n": 2}, (100, 6, 0)),
        ({"prompt": [[1, 2], [3]], "max_tokens": 5}, (5, 2, 0)),
        ({"prompt": [1, 2, 3], "max_tokens": 5}, (5, 1, 0)),  # one tokenized prompt
        ({"prompt": "hi"}, (COMPLETION_DEFAULT_MAX_TOKENS, 1, 0)),
    ],
)
def test_a_completion_counts_each_prompt_and_choice(body: dict[str, object], expected: tuple[int, int, int]) -> None:
    assert parsed("completions", **body) == expected


def test_a_chat_counts_its_choices_and_its_parts_that_are_not_text() -> None:
    image = {"type": "image_url", "image_url": {"url": "http://x/cat.png"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is it?"}, image, image]}]
    assert parsed("chat", messages=messages, n=3) == (None, 3, 2)
    assert parsed("chat", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=7) == (7, 1, 0)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"prompt": "hi", "max_tokens": None}, (None, 1, 0)),  # null: as many as the context leaves
        ({"prompt": "hi", "max_tokens": 0, "n": 0}, (None, 1, 0)),  # the engine refuses both
        ({"prompt": "hi", "max_tokens": "7", "n": 2.0}, (7, 2, 0)),  # what vLLM reads as 7 and 2
        ({"prompt": "hi", "max_tokens": "9" * 5000, "n": True}, (None, 1, 0)),
        ({"prompt": 5, "max_tokens": -3}, (None, 1, 0)),
    ],
)
def test_values_the_engine_judges_are_not_refused_here(
    body: dict[str, object], expected: tuple[int | None, int, int]
) -> None:
    assert parsed("completions", **body) == expected
    chat = parsed("chat", messages="not a list", temperature=-1, top_p=5, top_logprobs=99)
    assert chat == (None, 1, 0)


@pytest.mark.parametrize(
    ("options", "sent", "client_wants_usage"),
    [
        (None, {"include_usage": True}, False),
        ({"include_usage": True, "continuous_usage_stats": True}, None, True),  # sent as it came
        ({"continuous_usage_stats": True}, None, True),  # vLLM's include_usage defaults to true
        ({"include_usage": False, "continuous_usage_stats": True, "x": 1}, {"include_usage": True, "x": 1}, False),
        ("junk", None, False),  # the engine's to refuse
    ],
)
def test_a_stream_asks_for_usage_and_keeps_the_clients_other_options(
    options: object, sent: object, client_wants_usage: bool
) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    if options is not None:
        body["stream_options"] = options
    p = parse(json.dumps(body).encode(), "chat", path_model=None, toolkit=False)
    assert json.loads(p.body).get("stream_options") == (options if sent is None else sent)
    assert p.client_wants_usage is client_wants_usage
