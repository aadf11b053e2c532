"""The schemas and security schemes of the raw routes' document: OpenAI's request and answer bodies as the gateway
takes and relays them, LlmEndpoint's, and each surface's error envelope.

The gateway reads only a body's model and stream (api/gateway/bodies.py) and sends the rest to the engine as it came:
the bounds here are vLLM's, which the engine checks and answers in its own words, and every request schema allows
other fields. The toolkit's route is the exception: it checks its own schema, field for field.
"""

from __future__ import annotations

from typing import Any

import msgspec

from orchestrator.surfaces.llmendpoint.completions import Request as LlmEndpointRequest

Schema = dict[str, Any]

ROLES = ["system", "user", "assistant", "tool", "developer", "function"]
"""OpenAI's roles; vLLM takes any other name as well (a model's chat template decides what it means)."""
TOOLKIT_ROLES = ["system", "user", "assistant"]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: Schema) -> Schema:
    branches = schema["anyOf"] if set(schema) == {"anyOf"} else [schema]
    return {"anyOf": [*branches, {"type": "null"}]}


def _message() -> Schema:
    part = {
        "type": "object",
        "properties": {"type": {"type": "string", "examples": ["text", "image_url"]}, "text": {"type": "string"}},
        "required": ["type"],
        "description": "A part of a message: text, or an image, audio... for a model that takes them.",
    }
    return {
        "type": "object",
        "properties": {
            "role": {"type": "string", "examples": ROLES},
            "content": _nullable({"anyOf": [{"type": "string"}, {"type": "array", "items": part}]}),
            "name": {"type": "string"},
            "tool_calls": {"type": "array", "items": {"type": "object"}},
            "tool_call_id": {"type": "string"},
        },
        "required": ["role"],
    }


_POSITIVE = {"type": "integer", "minimum": 1}
_SAMPLING: Schema = {
    "stream": {"type": "boolean", "default": False, "description": "Answer as server-sent events."},
    "stream_options": _nullable(
        {
            "type": "object",
            "properties": {"include_usage": _nullable({"type": "boolean"})},
            "description": "`include_usage`: a last event with the call's usage.",
        }
    ),
    "temperature": _nullable({"type": "number", "minimum": 0}),
    "top_p": _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
    "frequency_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
    "presence_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
    "max_tokens": _nullable({**_POSITIVE, "description": "The most tokens each output may have."}),
    "n": _nullable({**_POSITIVE, "description": "How many outputs."}),
    "stop": _nullable({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}),
    "seed": _nullable({"type": "integer"}),
    "user": {"type": "string"},
    "logit_bias": _nullable({"type": "object", "additionalProperties": {"type": "number"}}),
}
_MODEL = {"type": "string", "minLength": 1, "description": "A model's name, as `/v1/models` lists them."}
_PASSED_ON = (
    "The gateway reads `model` and `stream`; every field, these included, is sent to the engine as it came (usage is "
    "asked for on a stream), and the engine's refusal of a value comes back as the engine gave it."
)


def _chat(*, model_required: bool = True, **extra: Schema) -> Schema:
    properties = {
        "model": _MODEL,
        "messages": {"type": "array", "items": ref("ChatRequestMessage"), "minItems": 1},
        **_SAMPLING,
        "max_completion_tokens": _nullable({**_POSITIVE, "description": "Wins over `max_tokens`."}),
        "logprobs": _nullable({"type": "boolean"}),
        "top_logprobs": _nullable(
            {
                "type": "integer",
                "minimum": 0,
                "description": "More than 0 needs `logprobs`; at most the engine's `--max-logprobs` (vLLM: 20).",
            }
        ),
        "tools": {"type": "array", "items": {"type": "object"}},
        "tool_choice": {"anyOf": [{"type": "string"}, {"type": "object"}]},
        "parallel_tool_calls": {"type": "boolean"},
        "response_format": {"type": "object", "examples": [{"type": "json_object"}]},
        **extra,
    }
    return {
        "type": "object",
        "properties": properties,
        "required": ["model", "messages"] if model_required else ["messages"],
        "additionalProperties": True,
        "description": _PASSED_ON,
    }


def _completion(*, model_required: bool = True) -> Schema:
    prompt = {
        "anyOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}},
            {"type": "array", "items": {"type": "integer"}},
            {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
        ],
        "description": "A prompt, a list of them, or tokens.",
    }
    properties = {
        "model": _MODEL,
        "prompt": prompt,
        **_SAMPLING,
        "echo": {"type": "boolean"},
        "suffix": {"type": "string"},
        "logprobs": _nullable({"type": "integer", "minimum": 0}),
    }
    properties["max_tokens"] = _nullable({**_POSITIVE, "default": 16})
    return {
        "type": "object",
        "properties": properties,
        "required": ["model", "prompt"] if model_required else ["prompt"],
        "additionalProperties": True,
        "description": _PASSED_ON,
    }


_USAGE: Schema = {
    "type": "object",
    "properties": {name: {"type": "integer"} for name in ("prompt_tokens", "completion_tokens", "total_tokens")},
}


def _answer(obj: str, choice: Schema) -> Schema:
    return {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "object": {"const": obj},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": {"type": "object", "properties": choice}},
            "usage": ref("CompletionUsage"),
        },
        "description": "The engine's answer, relayed.",
    }


_FINISH = _nullable({"type": "string", "examples": ["stop", "length", "tool_calls"]})


def _queue_fields() -> Schema:
    return {
        "priority": {
            "type": "integer",
            "minimum": -(2**31),
            "maximum": 2**31 - 1,
            "default": 0,
            "description": "Lower goes first, in the model's queue.",
        },
        "timeout": {
            "type": "number",
            "exclusiveMinimum": 0,
            "maximum": 3600,
            "description": "Seconds to wait in the queue before a 408.",
        },
    }


def _toolkit_chat() -> Schema:
    """The toolkit's chat request (api/gateway/toolkit_schema.py): its fields only, none of them null."""
    unit, penalty = {"type": "number", "minimum": 0, "maximum": 1}, {"type": "number", "minimum": -2, "maximum": 2}
    strings = {"type": "array", "items": {"type": "string"}}
    named_tool = ref("ToolkitNamedTool")
    properties = {
        "messages": {"type": "array", "items": ref("ToolkitChatRequestMessage"), "minItems": 1},
        "model": _MODEL,
        "max_tokens": _POSITIVE,
        "n": _POSITIVE,
        "stop": {"anyOf": [{"type": "string"}, strings]},
        "frequency_penalty": penalty,
        "presence_penalty": penalty,
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "stream": {"type": "boolean", "default": False},
        "stream_options": _closed({"include_usage": {"type": "boolean"}}),
        "logit_bias": {"type": "object", "additionalProperties": {"type": "integer", "minimum": -100, "maximum": 100}},
        "logprobs": {"type": "boolean"},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20, "description": "Needs `logprobs`."},
        "top_p": unit,
        "seed": {"type": "integer"},
        "response_format": _closed({"type": {"enum": ["text", "json_object"]}}, required=["type"]),
        "tool_choice": {"anyOf": [{"enum": ["none", "auto", "required"]}, named_tool]},
        "tools": {"type": "array", "items": named_tool},
        "user": {"type": "string"},
        "function_call": {"anyOf": [{"enum": ["none", "auto"]}, named_tool], "deprecated": True},
        "functions": {"type": "array", "items": ref("ToolkitFunction"), "deprecated": True},
        "guided_json": {"type": "object", "description": "A JSON schema the answer follows."},
        "guided_decoding_backend": {"type": "string"},
        "guided_choice": strings,
        "guided_regex": {"type": "string"},
        "raw_stream_response": {
            "type": "boolean",
            "default": True,
            "description": "How a stream is answered: true, server-sent events (`data: {...}`); false, each event's "
            "JSON alone on a line. Either way only the events with choices, and no `[DONE]`.",
        },
    }
    return {
        **_closed(properties, required=["messages", "model"]),
        "description": "Every field is checked as the toolkit checks it; an unknown one is refused.",
    }


def _closed(properties: Schema, *, required: list[str] | None = None) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def _llmendpoint() -> dict[str, Schema]:
    """LlmEndpoint's request, from the struct its route decodes (its names prefixed: `Request` says nothing here)."""
    _, found = msgspec.json.schema_components([LlmEndpointRequest], ref_template="#/components/schemas/{name}")
    text = msgspec.json.encode(found).decode()
    for name in found:
        text = text.replace(f"#/components/schemas/{name}", f"#/components/schemas/LlmEndpoint{name}")
    renamed: dict[str, Schema] = msgspec.json.decode(text)
    schemas = {f"LlmEndpoint{name}": schema for name, schema in renamed.items()}
    schemas["LlmEndpointRequest"]["required"] = ["messages", "model", "max_tokens"]
    return schemas


def schemas() -> dict[str, Schema]:
    return {
        "ChatRequestMessage": _message(),
        "ToolkitChatRequestMessage": _closed(
            {"role": {"enum": TOOLKIT_ROLES}, "content": {}, "extra_field": {"type": "string"}},
            required=["role", "content"],
        ),
        "ToolkitFunction": _closed(
            {"name": {"type": "string"}, "description": {"type": "string"}, "parameters": {"type": "object"}},
            required=["name"],
        ),
        "ToolkitNamedTool": _closed(
            {"type": {"const": "function"}, "function": ref("ToolkitFunction")}, required=["type", "function"]
        ),
        "ChatCompletionRequest": _chat(),
        "ChatCompletionRequestModelInPath": _chat(model_required=False),
        "ToolkitChatCompletionRequest": _toolkit_chat(),
        "QueuedChatCompletionRequest": _chat(**_queue_fields()),
        "CompletionRequest": _completion(),
        "CompletionRequestModelInPath": _completion(model_required=False),
        "CompletionUsage": _USAGE,
        "ChatCompletion": _answer(
            "chat.completion",
            {"index": {"type": "integer"}, "message": {"type": "object"}, "finish_reason": _FINISH},
        ),
        "Completion": _answer(
            "text_completion", {"index": {"type": "integer"}, "text": {"type": "string"}, "finish_reason": _FINISH}
        ),
        "ModelList": {
            "type": "object",
            "properties": {
                "object": {"const": "list"},
                "data": {"type": "array", "items": ref("ListedModel")},
            },
            "required": ["object", "data"],
        },
        "ListedModel": {
            "type": "object",
            "properties": {
                "id": {"type": "string"},
                "object": {"const": "model"},
                "created": {"type": "integer"},
                "owned_by": {"type": "string"},
                "multiple": {"type": "boolean", "description": "Several models answer under this name."},
            },
            "required": ["id", "object", "created", "owned_by"],
        },
        "OpenAIErrorEnvelope": {
            "type": "object",
            "properties": {
                "error": {
                    "type": "object",
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": _nullable({"type": "string"}),
                        "code": {"type": "string", "description": "The HTTP status."},
                    },
                    "required": ["message", "type", "param", "code"],
                    "additionalProperties": False,
                }
            },
            "required": ["error"],
            "additionalProperties": False,
        },
        "ToolkitErrorEnvelope": {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
                    "required": ["error"],
                    "description": "What went wrong; a 429 adds `message` and `allowed_rpm`.",
                },
                {
                    "type": "object",
                    "properties": {"errors": {"type": "object"}},
                    "required": ["errors"],
                    "description": "A body that is not valid: every error, by field, then by list index or key "
                    '(`{"messages": {"0": {"role": ["Must be one of: system, user, assistant."]}}}`)',
                },
            ]
        },
        "LlmEndpointFailure": {
            "type": "object",
            "properties": {
                "success": {"const": False},
                "message": {"type": "string"},
                "detail": {"type": "string"},
            },
            "required": ["success", "message"],
            "additionalProperties": False,
        },
        "LlmEndpointAnswer": {
            "type": "object",
            "properties": {"success": {"const": True}, "response": {"type": "string"}},
            "required": ["success", "response"],
        },
        **_llmendpoint(),
    }


KEY = "A client key (POST /api/v1/generate_api_key), or a connector's key."
SECURITY_SCHEMES: dict[str, Schema] = {
    "ClientKey": {"type": "http", "scheme": "bearer", "description": f"`Authorization: Bearer <key>`. {KEY}"},
    "ClientKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key", "description": KEY},
    "ClientKeyAzureHeader": {"type": "apiKey", "in": "header", "name": "api-key", "description": KEY},
    "ClientKeyAlone": {
        "type": "apiKey",
        "in": "header",
        "name": "Authorization",
        "description": f"`Authorization: <key>`, without `Bearer` (LlmEndpoint's way; the gateway takes it too). {KEY}",
    },
}
GATEWAY_SECURITY: list[dict[str, list[str]]] = [
    {"ClientKey": []},
    {"ClientKeyHeader": []},
    {"ClientKeyAzureHeader": []},
    {"ClientKeyAlone": []},
]
