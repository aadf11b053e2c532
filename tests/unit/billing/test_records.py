"""The texts of a call record, read from its raw bytes off the hot path: the prompt (whole and last message) of a
chat or completions request, the first choice's text of a whole answer or of a stream's relayed events, and the
tokens of a stream counted from its events when the engine's usage never came."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from orchestrator.billing.records import completion_text, prompt_texts, relayed_tokens

DONE = b"data: [DONE]\n\n"


def event(document: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(document).encode() + b"\n\n"


def delta(content: object, index: int = 0) -> bytes:
    return event({"choices": [{"index": index, "delta": {"content": content}}]})


def text_event(text: object, index: int = 0) -> bytes:
    return event({"choices": [{"index": index, "text": text}]})


def whole(choices: list[dict[str, Any]]) -> bytes:
    return json.dumps({"id": "x", "choices": choices, "usage": {"prompt_tokens": 1}}).encode()


# -- prompt_texts ----------------------------------------------------------------------------------


def test_a_chat_prompt_is_its_messages_as_sent_and_the_last_ones_content() -> None:
    request = b'{"model":"m","messages":[{"role":"system","content":"be brief"},{"role": "user", "content":"hi"}]}'
    assert prompt_texts("chat", request) == (
        '[{"role":"system","content":"be brief"},{"role": "user", "content":"hi"}]',  # the bytes as they came
        "hi",
    )


def test_a_content_that_is_not_text_is_kept_as_json() -> None:
    request = b'{"messages":[{"role":"user","content":[{"type":"text","text":"x"}]}]}'
    assert prompt_texts("chat", request) == (
        '[{"role":"user","content":[{"type":"text","text":"x"}]}]',
        '[{"type":"text","text":"x"}]',
    )


def test_a_last_message_without_content_has_no_last_text() -> None:
    assert prompt_texts("chat", b'{"messages":[{"role":"user"}]}') == ('[{"role":"user"}]', None)


def test_utf8_text_is_read_as_text() -> None:
    request = '{"messages":[{"role":"user","content":"café ☕"}]}'.encode()
    assert prompt_texts("chat", request) == ('[{"role":"user","content":"café ☕"}]', "café ☕")


@pytest.mark.parametrize(
    "request_body",
    [
        b'{"messages":[]}',
        b"{}",
        b"not json",
        b"",
        b'{"messages":"x"}',
        b'{"messages":[1, 2]}',  # a message that is not an object
        b'{"messages":[{"role":"user","content":"\xff"}]}',  # broken UTF-8
        b'{"messages":[{"role":"user","content":"caf\xc3"}]}',  # a character cut in half
        b'{"messages":[{"role":"user","content":"hi"}',  # cut short
    ],
)
def test_a_chat_request_with_no_readable_messages_has_no_texts(request_body: bytes) -> None:
    assert prompt_texts("chat", request_body) == (None, None)


@pytest.mark.parametrize(
    ("request_body", "text"),
    [
        (b'{"model":"m","prompt":"once upon"}', "once upon"),
        (b'{"prompt":["a","b"]}', '["a","b"]'),
        (b'{"prompt":[1,2]}', "[1,2]"),  # token ids
        (b"{}", None),
        (b'{"prompt":null}', None),
    ],
)
def test_a_completions_prompt_is_both_the_whole_and_the_last(request_body: bytes, text: str | None) -> None:
    assert prompt_texts("completions", request_body) == (text, text)


@pytest.mark.parametrize("request_body", [b"{", b"[]", b'{"prompt":"\xff"}', b'"prompt"'])
def test_a_broken_completions_request_has_no_texts(request_body: bytes) -> None:
    assert prompt_texts("completions", request_body) == (None, None)


def test_the_kind_decides_which_field_is_read() -> None:
    both = b'{"prompt":"p","messages":[{"role":"user","content":"m"}]}'
    assert prompt_texts("completions", both) == ("p", "p")
    assert prompt_texts("chat", both)[1] == "m"


# -- completion_text of a whole answer -------------------------------------------------------------


def test_a_whole_chat_answer_is_its_first_choices_message() -> None:
    assert completion_text(whole([{"index": 0, "message": {"role": "assistant", "content": "hello"}}])) == "hello"


def test_the_first_choice_is_index_zero_wherever_it_is() -> None:
    answer = whole([{"index": 1, "message": {"content": "b"}}, {"index": 0, "message": {"content": "a"}}])
    assert completion_text(answer) == "a"
    assert completion_text(whole([{"index": 1, "message": {"content": "b"}}])) is None


def test_a_whole_completions_answer_is_its_first_choices_text() -> None:
    assert completion_text(whole([{"index": 0, "text": "plain"}])) == "plain"


def test_a_content_that_is_not_text_is_json_and_none_is_none() -> None:
    assert completion_text(whole([{"index": 0, "message": {"content": [{"type": "text"}]}}])) == '[{"type":"text"}]'
    assert completion_text(whole([{"index": 0, "message": {"content": None}}])) is None
    # A message without content is not read as a completion's text, even if the choice has one.
    assert completion_text(whole([{"index": 0, "message": {}, "text": "t"}])) is None


@pytest.mark.parametrize("answer", [b"", b"garbage", b"\xff\xfe", b'{"choices":[]}', b"{}", b'{"choices":"x"}', b"{"])
def test_a_whole_answer_with_no_readable_choice_has_no_text(answer: bytes) -> None:
    assert completion_text(answer) is None


# -- completion_text and relayed_tokens of a stream ------------------------------------------------


def test_a_chat_stream_is_its_deltas_joined_and_a_token_per_event_with_text() -> None:
    events = [
        event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}),
        delta("Hel") + delta("lo"),  # several events may come in one chunk
        delta(", world"),
        event({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 3}}),
        DONE,
    ]
    assert completion_text(events) == "Hello, world"
    assert relayed_tokens(events) == 3


def test_a_completions_stream_is_its_texts_joined() -> None:
    events = [text_event("a"), text_event("b"), text_event(""), DONE]
    assert completion_text(events) == "ab"
    assert relayed_tokens(events) == 2  # an empty text is no token


def test_an_empty_stream_has_no_text_and_no_tokens() -> None:
    assert completion_text([]) is None
    assert relayed_tokens([]) == 0
    assert completion_text([DONE]) is None
    assert completion_text([delta(""), DONE]) is None  # nothing but empty parts
    assert relayed_tokens([delta(""), delta(None)]) == 0


def test_only_the_first_choice_makes_the_text_but_every_choice_with_text_is_a_token() -> None:
    both = event({"choices": [{"index": 0, "delta": {"content": "x"}}, {"index": 1, "delta": {"content": "y"}}]})
    assert completion_text([both]) == "x"
    assert relayed_tokens([both]) == 2
    assert completion_text([delta("other", index=1)]) is None
    assert relayed_tokens([delta("other", index=1)]) == 1


def test_a_delta_without_content_is_no_text_even_beside_a_text_field() -> None:
    odd = event({"choices": [{"index": 0, "delta": {"content": None}, "text": "t"}]})
    assert completion_text([odd]) is None
    assert relayed_tokens([odd]) == 0


def test_broken_events_comments_and_a_last_event_without_its_blank_line() -> None:
    events = [
        b": keep-alive\n\n",
        b"data: {broken\n\n",
        b"data: {\xff}\n\n",  # not JSON at all: skipped
        delta("a"),
        b'data: {"choices":[{"index":0,"delta":{"content":"b"}}]}',  # the stream ended without its blank line
    ]
    assert completion_text(events) == "ab"
    assert relayed_tokens(events) == 2


@pytest.mark.parametrize(
    ("read", "expected"),
    [
        (
            lambda: completion_text([delta("a"), b'data: {"choices":[{"index":0,"delta":{"content":"caf\xc3"}}]}\n\n']),
            "a",
        ),
        (lambda: relayed_tokens([delta("a"), b'data: {"choices":[{"index":0,"delta":{"content":"\xff"}}]}\n\n']), 1),
        (lambda: completion_text(b'{"choices":[{"index":0,"message":{"content":"\xff"}}]}'), None),
    ],
)
def test_broken_utf8_in_an_answer_is_skipped_like_any_broken_document(
    read: Callable[[], object], expected: object
) -> None:
    assert read() == expected
