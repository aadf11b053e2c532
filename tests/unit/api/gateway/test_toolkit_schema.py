"""The toolkit's chat schema: the bodies the toolkit accepts and what it loads from them, the bodies it refuses and
its errors, word for word (its own API tests' cases among them); and the gateway's parse on the toolkit's route
against the OpenAI routes, which pass fields through to the engine."""

from __future__ import annotations

import json
from typing import Any

import pytest

from api.gateway.bodies import BadBody, parse
from api.gateway.toolkit_schema import Invalid, load_chat

HI = [{"role": "user", "content": "test message"}]
TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The weather", "parameters": {"type": "object"}},
}


def errors(body: Any) -> Any:
    with pytest.raises(Invalid) as refused:
        load_chat(body)
    return refused.value.messages


def loaded(**fields: Any) -> dict[str, Any]:
    return load_chat({"model": "m", "messages": HI, **fields}).document


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        # The toolkit's own API tests (test_apis.py, TestChatCompletionsEndpoint.test_validation_errors).
        ({"messages": []}, {"messages": ["Shorter than minimum length 1."]}),
        ({"messages": [{"role": "user"}]}, {"messages": {"0": {"content": ["Missing data for required field."]}}}),
        ({"model": ""}, {"model": ["Model must not be empty."]}),
        ({"stop": 123}, {"stop": ["stop must be either a string or a list of strings"]}),
        ({"stop": ["valid_stop", 123]}, {"stop": ["All elements in the stop list must be strings"]}),
        (
            {"presence_penalty": 3},
            {"presence_penalty": ["Must be greater than or equal to -2.0 and less than or equal to 2.0."]},
        ),
        (
            {"frequency_penalty": -3},
            {"frequency_penalty": ["Must be greater than or equal to -2.0 and less than or equal to 2.0."]},
        ),
        ({"temperature": 3}, {"temperature": ["Must be greater than or equal to 0.0 and less than or equal to 2.0."]}),
        ({"top_p": 1.5}, {"top_p": ["Must be greater than or equal to 0.0 and less than or equal to 1.0."]}),
        ({"top_logprobs": 15}, {"top_logprobs": ["top_logprobs can only be set if logprobs is True"]}),
        (
            {"logprobs": True, "top_logprobs": 25},
            {"top_logprobs": ["Must be greater than or equal to 0 and less than or equal to 20."]},
        ),
        ({"max_tokens": -1}, {"max_tokens": ["Must be greater than or equal to 1."]}),
        (
            {"logit_bias": {"token_id": 150}},
            {
                "logit_bias": {
                    "token_id": {"value": ["Must be greater than or equal to -100 and less than or equal to 100."]}
                }
            },
        ),
        ({"stream_options": "invalid_option"}, {"stream_options": {"_schema": ["Invalid input type."]}}),
        (
            {"tool_choice": "invalid_choice_value"},
            {"tool_choice": [["Must be one of: none, auto, required."], {"_schema": ["Invalid input type."]}]},
        ),
        (
            {"tool_choice": {"type": "function"}},
            {"tool_choice": [["Not a valid string."], {"function": ["Missing data for required field."]}]},
        ),
        (
            {"tool_choice": {"type": "invalid_type", "function": {"name": "test_function"}}},
            {"tool_choice": [["Not a valid string."], {"type": ["Must be equal to function."]}]},
        ),
        (
            {"tools": [{"type": "invalid_type", "function": {"name": "test_function"}}]},
            {"tools": {"0": {"type": ["Must be equal to function."]}}},
        ),
        (
            {"tools": [{"type": "function", "function": {"description": "testing"}}]},
            {"tools": {"0": {"function": {"name": ["Missing data for required field."]}}}},
        ),
        # Its backend's integration tests: guided_regex must be a string.
        ({"guided_regex": {"1": "Python", "2": "C++"}}, {"guided_regex": ["Not a valid string."]}),
        # The rest of its fields.
        ({"tools": TOOL}, {"tools": ["Not a valid list."]}),
        (
            {"tools": [{**TOOL, "function": {**TOOL["function"], "strict": True}}]},
            {"tools": {"0": {"function": {"strict": ["Unknown field."]}}}},
        ),
        (
            {"tools": [{**TOOL, "function": {"name": "f", "parameters": "{}"}}]},
            {"tools": {"0": {"function": {"parameters": ["Not a valid mapping type."]}}}},
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            {"response_format": {"type": ["Must be one of: text, json_object."], "json_schema": ["Unknown field."]}},
        ),
        ({"response_format": {}}, {"response_format": {"type": ["Missing data for required field."]}}),
        ({"logit_bias": [1, 2]}, {"logit_bias": ["Not a valid mapping type."]}),
        ({"logit_bias": {"50256": "x"}}, {"logit_bias": {"50256": {"value": ["Not a valid integer."]}}}),
        ({"guided_json": "{}"}, {"guided_json": ["Not a valid mapping type."]}),
        ({"guided_choice": ["a", 1]}, {"guided_choice": {"1": ["Not a valid string."]}}),
        ({"guided_choice": "a"}, {"guided_choice": ["Not a valid list."]}),
        ({"guided_decoding_backend": 1}, {"guided_decoding_backend": ["Not a valid string."]}),
        (
            {"function_call": "required"},
            {"function_call": [["Must be one of: none, auto."], {"_schema": ["Invalid input type."]}]},
        ),
        (
            {"function_call": {"name": "f"}},
            {
                "function_call": [
                    ["Not a valid string."],
                    {
                        "function": ["Missing data for required field."],
                        "type": ["Missing data for required field."],
                        "name": ["Unknown field."],
                    },
                ]
            },
        ),
        ({"functions": [{"description": "d"}]}, {"functions": {"0": {"name": ["Missing data for required field."]}}}),
        ({"seed": True}, {"seed": ["Not a valid integer."]}),
        ({"seed": "x"}, {"seed": ["Not a valid integer."]}),
        ({"user": 7}, {"user": ["Not a valid string."]}),
        ({"n": 0}, {"n": ["Must be greater than or equal to 1."]}),
        ({"stream": "maybe"}, {"stream": ["Not a valid boolean."]}),
        ({"raw_stream_response": [False]}, {"raw_stream_response": ["Not a valid boolean."]}),
        ({"temperature": "hot"}, {"temperature": ["Not a valid number."]}),
        ({"temperature": "nan"}, {"temperature": ["Special numeric values (nan or infinity) are not permitted."]}),
        ({"max_tokens": None}, {"max_tokens": ["Field may not be null."]}),
        ({"stop": None}, {"stop": ["Field may not be null."]}),
        (
            {"stream_options": {"continuous_usage_stats": True}},
            {"stream_options": {"continuous_usage_stats": ["Unknown field."]}},
        ),
        # Fields the toolkit does not know, at any level.
        (
            {"max_completion_tokens": 5, "parallel_tool_calls": False},
            {"max_completion_tokens": ["Unknown field."], "parallel_tool_calls": ["Unknown field."]},
        ),
        (
            {"messages": [{"role": "user", "content": "x", "name": "bob"}]},
            {"messages": {"0": {"name": ["Unknown field."]}}},
        ),
        (
            {"messages": [{"role": "tool", "content": "x"}]},
            {"messages": {"0": {"role": ["Must be one of: system, user, assistant."]}}},
        ),
        (
            {"messages": [{"role": "assistant", "content": None}]},
            {"messages": {"0": {"content": ["Field may not be null."]}}},
        ),
        ({"messages": ["hi"]}, {"messages": {"0": {"_schema": ["Invalid input type."]}}}),
        ({"messages": [None]}, {"messages": {"0": ["Field may not be null."]}}),
        # Checks of the whole request wait for every field to pass.
        (
            {"model": "", "temperature": 3},
            {"temperature": ["Must be greater than or equal to 0.0 and less than or equal to 2.0."]},
        ),
        (
            {"model": "", "stop": [1], "top_logprobs": 1},
            {
                "model": ["Model must not be empty."],
                "stop": ["All elements in the stop list must be strings"],
                "top_logprobs": ["top_logprobs can only be set if logprobs is True"],
            },
        ),
    ],
)
def test_refused_as_the_toolkit_refuses(fields: dict[str, Any], expected: Any) -> None:
    assert errors({"model": "m", "messages": HI, **fields}) == expected


@pytest.mark.parametrize("body", [None, [], "x", 5])
def test_a_body_that_is_not_an_object(body: Any) -> None:
    assert errors(body) == {"_schema": ["Invalid input type."]}


def test_missing_required_fields() -> None:
    assert errors({}) == {
        "messages": ["Missing data for required field."],
        "model": ["Missing data for required field."],
    }


@pytest.mark.parametrize(
    "fields",
    [
        # The playground's body, and its backend's tests' and sample's.
        {
            "messages": [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}],
            "stream": True,
            "raw_stream_response": False,
            "temperature": 0.7,
            "max_tokens": 512,
            "presence_penalty": 0.7,
            "frequency_penalty": 0.6,
        },
        {"max_tokens": 100, "n": 2, "stop": ["lived happily ever after."], "user": "example_user"},
        {"logprobs": True, "top_logprobs": 0, "temperature": 0.0, "seed": 0},
        {"guided_choice": ["Python", "Java"], "guided_decoding_backend": "outlines"},
        {"guided_json": {"type": "object", "properties": {"name": {"type": "string"}}}},
        {"guided_regex": r"\d+"},
        {"tools": [TOOL], "tool_choice": "required"},
        {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
        {"functions": [{"name": "f", "parameters": {}}], "function_call": "auto"},
        {"response_format": {"type": "json_object"}},
        {"logit_bias": {"50256": -100, "11": 100}},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is 1+1?"}], "extra_field": "0"}]},
        {"stop": "\n", "seed": 2**63},
    ],
)
def test_accepted_as_the_toolkit_accepts(fields: dict[str, Any]) -> None:
    expected = {"model": "m", "messages": HI, **fields}
    expected.pop("raw_stream_response", None)  # the toolkit's own, never the engine's
    if expected.get("stream"):
        expected["stream_options"] = {"include_usage": True}
    assert loaded(**fields) == expected


def test_what_is_loaded_is_what_the_engine_gets() -> None:
    # As marshmallow converts them: numbers from strings, floats to ints by truncation, booleans from words.
    doc = loaded(max_tokens="5", n=2.0, temperature="0.7", top_p=1, stream="yes", logprobs=1, top_logprobs="3")
    assert doc == {
        "model": "m",
        "messages": HI,
        "max_tokens": 5,
        "n": 2,
        "temperature": 0.7,
        "top_p": 1.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logprobs": True,
        "top_logprobs": 3,
    }
    assert loaded(max_tokens=1.9)["max_tokens"] == 1
    # The toolkit's defaults (temperature 1, top_p 1, n 1...) are not added: the engine's own apply.
    assert loaded() == {"model": "m", "messages": HI}


def test_stream_options_follow_stream_and_raw_stream_response_is_the_toolkits() -> None:
    chat = load_chat({"model": "m", "messages": HI, "stream": True, "stream_options": {"include_usage": False}})
    assert (chat.document["stream_options"], chat.raw_stream_response) == ({"include_usage": True}, True)
    chat = load_chat({"model": "m", "messages": HI, "stream_options": {}, "raw_stream_response": "false"})
    assert "stream_options" not in chat.document
    assert chat.raw_stream_response is False


def body(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "messages": HI, **fields}).encode()


def test_the_toolkits_route_refuses_with_every_error_and_sends_what_it_loaded() -> None:
    with pytest.raises(BadBody) as refused:
        parse(body(max_completion_tokens=5, tool_choice="x"), "chat", path_model=None, toolkit=True)
    assert refused.value.errors == {
        "max_completion_tokens": ["Unknown field."],
        "tool_choice": [["Must be one of: none, auto, required."], {"_schema": ["Invalid input type."]}],
    }
    parsed = parse(body(stream=True, raw_stream_response=False, max_tokens="7"), "chat", path_model=None, toolkit=True)
    assert (parsed.stream, parsed.raw_stream_response, parsed.max_tokens) == (True, False, 7)
    assert json.loads(parsed.body) == {
        "model": "m",
        "messages": HI,
        "stream": True,
        "max_tokens": 7,
        "stream_options": {"include_usage": True},
    }
    with pytest.raises(BadBody) as refused:
        parse(b"[]", "chat", path_model=None, toolkit=True)
    assert refused.value.errors == {"_schema": ["Invalid input type."]}


def test_the_openai_routes_pass_fields_through_to_the_engine() -> None:
    raw = body(max_completion_tokens=5, tool_choice="x", response_format={"type": "json_schema"})
    parsed = parse(raw, "chat", path_model=None, toolkit=False)
    assert parsed.body == raw
    assert parsed.raw_stream_response is None
