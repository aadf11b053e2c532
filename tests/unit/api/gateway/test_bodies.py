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
