"""The official `openai` client on every OpenAI route of the gateway gets what it gets from the engine itself.

A real `orchestrator serve` and a real engine simulator process; each call is made twice, to the engine directly
and through the gateway, and the answers (less their ids and times) and the errors (status and body) must match.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.engines import Engine, engine_process
from tests.support.server import serving

MODEL = "llama"
MESSAGES: list[Any] = [{"role": "user", "content": "one two three"}]


@dataclass(frozen=True)
class Alias:
    name: str
    base: str  # the client's base_url, less the server's origin
    completions: bool = True  # it serves /completions too
    stream: bool = True


ALIASES = [
    Alias("v1", "/v1"),
    Alias("root", ""),
    Alias("engines", f"/engines/{MODEL}"),
    Alias("deployments", f"/openai/deployments/{MODEL}"),
    Alias("queue", "/queue", completions=False),
    Alias("toolkit", "/api/v1", completions=False, stream=False),
]
CHAT_ALIASES = [pytest.param(a, id=a.name) for a in ALIASES]
STREAM_ALIASES = [pytest.param(a, id=a.name) for a in ALIASES if a.stream]
COMPLETION_ALIASES = [pytest.param(a, id=a.name) for a in ALIASES if a.completions]


@dataclass(frozen=True)
class Setup:
    engine: openai.OpenAI
    gateways: dict[str, openai.OpenAI]

    def gateway(self, alias: Alias) -> openai.OpenAI:
        return self.gateways[alias.name]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    state: Path = tmp_path_factory.mktemp("openai-client") / "state"
    engine: Engine
    with (
        engine_process(MODEL) as (engine, _),
        serving(state, env={"ORCH_PROBE_STARTING_INTERVAL_S": "0.2"}) as (origin, _),
    ):
        admin = {"Authorization": f"Bearer {(state / 'admin_api_key').read_text().strip()}"}
        model_id = httpx.post(f"{origin}/api/v1/models", json={"name": MODEL}, headers=admin).json()["id"]
        replica = httpx.post(
            f"{origin}/api/v1/models/{model_id}/replicas", json={"endpoint": engine.chat_url}, headers=admin
        ).json()["replica_id"]
        deadline = time.monotonic() + 30
        while httpx.get(f"{origin}/api/v1/replicas/{replica}", headers=admin).json()["status"] != "READY":
            assert time.monotonic() < deadline, "the replica never became READY"
            time.sleep(0.05)
        body = {"user_id": "sdk", "allowed_rpm": 100_000}
        key = httpx.post(f"{origin}/api/v1/generate_api_key", json=body, headers=admin).json()["api_key"]
        clients = {a.name: openai.OpenAI(api_key=key, base_url=f"{origin}{a.base}", max_retries=0) for a in ALIASES}
        direct = openai.OpenAI(api_key="unused", base_url=f"{engine.url}/v1", max_retries=0)
        try:
            yield Setup(direct, clients)
        finally:
            for client in [direct, *clients.values()]:
                client.close()


def same(answer: Any) -> dict[str, Any]:
    """An answer less what differs between two calls."""
    dumped: dict[str, Any] = answer.model_dump(exclude={"id", "created"})
    return dumped


def both(setup: Setup, alias: Alias, call: Callable[[openai.OpenAI], Any]) -> tuple[Any, Any]:
    return call(setup.engine), call(setup.gateway(alias))


# --- answers ---


@pytest.mark.parametrize("alias", CHAT_ALIASES)
def test_chat_n_stop_and_logprobs(setup: Setup, alias: Alias) -> None:
    def call(client: openai.OpenAI) -> Any:
        return client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=8, n=2, stop=["fox"], logprobs=True, top_logprobs=3
        )

    engine, gateway = both(setup, alias, call)
    assert same(gateway) == same(engine)
    assert [c.index for c in gateway.choices] == [0, 1]
    assert gateway.choices[0].message.content == " the quick brown "
    assert gateway.choices[0].finish_reason == "stop"
    assert gateway.choices[0].logprobs.content[0].top_logprobs[0].token == " the"
    assert gateway.choices[1].message.content == " quick brown "  # each choice starts at another word


@pytest.mark.parametrize("alias", STREAM_ALIASES)
def test_chat_stream_with_logprobs_and_usage(setup: Setup, alias: Alias) -> None:
    def call(client: openai.OpenAI) -> list[dict[str, Any]]:
        stream = client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=5,
            n=2,
            stop="brown",
            logprobs=True,
            top_logprobs=2,
            stream=True,
            stream_options={"include_usage": True},
        )
        return [same(chunk) for chunk in stream]

    engine, gateway = both(setup, alias, call)
    assert gateway == engine
    assert gateway[-1]["choices"] == []
    assert gateway[-1]["usage"]["completion_tokens"] == 3 + 2  # " the quick brown", " quick brown"


@pytest.mark.parametrize("alias", STREAM_ALIASES)
def test_a_stream_without_usage_asked_gets_none(setup: Setup, alias: Alias) -> None:
    def call(client: openai.OpenAI) -> list[dict[str, Any]]:
        stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, stream=True)
        return [same(chunk) for chunk in stream]

    engine, gateway = both(setup, alias, call)
    assert gateway == engine
    assert all(chunk["usage"] is None for chunk in gateway)


@pytest.mark.parametrize("alias", STREAM_ALIASES)
@pytest.mark.parametrize(
    "options",
    [
        {"include_usage": True, "continuous_usage_stats": True},
        {"continuous_usage_stats": True},
        {"include_usage": False, "continuous_usage_stats": True},
    ],
    ids=["usage-in-every-chunk", "usage-by-default", "usage-refused"],
)
def test_a_streams_usage_options_reach_the_engine(setup: Setup, alias: Alias, options: dict[str, bool]) -> None:
    def call(client: openai.OpenAI) -> list[dict[str, Any]]:
        stream = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=3, stream=True, extra_body={"stream_options": options}
        )
        return [same(chunk) for chunk in stream]

    engine, gateway = both(setup, alias, call)
    assert gateway == engine
    with_usage = [chunk["usage"]["total_tokens"] for chunk in gateway if chunk["usage"] is not None]
    assert len(with_usage) == (len(gateway) if options.get("include_usage", True) else 0)  # vLLM's default: True


@pytest.mark.parametrize("alias", COMPLETION_ALIASES)
def test_completions_n_stop_echo_and_logprobs(setup: Setup, alias: Alias) -> None:
    def call(client: openai.OpenAI) -> Any:
        return client.completions.create(
            model=MODEL, prompt=["one two", "three"], max_tokens=6, n=2, stop="jumps", logprobs=2, echo=True
        )

    engine, gateway = both(setup, alias, call)
    assert same(gateway) == same(engine)
    assert [c.index for c in gateway.choices] == [0, 1, 2, 3]
    assert gateway.choices[0].text == "one two the quick brown fox "
    assert gateway.choices[0].logprobs.tokens[:2] == [" the", " quick"]


@pytest.mark.parametrize("alias", COMPLETION_ALIASES)
def test_completions_stream_with_logprobs(setup: Setup, alias: Alias) -> None:
    def call(client: openai.OpenAI) -> list[dict[str, Any]]:
        stream = client.completions.create(
            model=MODEL, prompt="one two", max_tokens=4, logprobs=1, stream=True, stream_options={"include_usage": True}
        )
        return [same(chunk) for chunk in stream]

    engine, gateway = both(setup, alias, call)
    assert gateway == engine
    assert [c["choices"][0]["logprobs"]["tokens"] for c in gateway[:-1]] == [[" the"], [" quick"], [" brown"], [" fox"]]


# --- vLLM's refusals reach the client as vLLM gives them ---

TOOLKIT_OWN_CHECKS = {  # case: the field the toolkit's own schema refuses, in its shape, before an engine is asked
    "guided_regex_not_a_string": "guided_regex",
    "n_0": "n",
    "temperature_negative": "temperature",
    "top_p_above_1": "top_p",
    "max_tokens_0": "max_tokens",
    "top_logprobs_above_max": "top_logprobs",
    "top_logprobs_without_logprobs": "top_logprobs",
    "custom_role": "messages",
    "temperature_3": "temperature",
    "top_logprobs_0_without_logprobs": "top_logprobs",
}
"""The toolkit's route checks its chat schema as the toolkit's backend does (0 <= temperature <= 2, roles system,
user or assistant, ...): `{"errors": {field: [...]}}`. Every other route leaves the values to the engine."""


def toolkits_own_refusal(setup: Setup, alias: Alias, case: str, extra: dict[str, Any]) -> bool:
    """Whether the toolkit's route refuses this case itself; if so, checks that it does, in the toolkit's shape."""
    field = TOOLKIT_OWN_CHECKS.get(case) if alias.name == "toolkit" else None
    if field is None:
        return False
    refused = refusal(lambda: _chat_error(setup.gateway(alias), extra))
    assert isinstance(refused, openai.BadRequestError)
    assert isinstance(refused.body, dict)
    assert list(refused.body["errors"]) == [field]
    return True


PATH_MODEL = {"engines", "deployments"}  # the model in the path wins over the body's: no unknown model there

CHAT_ERRORS: dict[str, dict[str, Any]] = {
    "stream_options_without_stream": {"stream_options": {"include_usage": True}},
    "seed_too_big": {"seed": 2**63},
    "tool_choice_without_tools": {"tool_choice": {"type": "function", "function": {"name": "f"}}},
    "guided_regex_not_a_string": {"extra_body": {"guided_regex": 123}},
    "n_0": {"n": 0},
    "temperature_negative": {"temperature": -1},
    "top_p_0": {"top_p": 0},
    "top_p_above_1": {"top_p": 1.5},
    "max_tokens_0": {"max_tokens": 0},
    "top_logprobs_above_max": {"logprobs": True, "top_logprobs": 21},
    "top_logprobs_without_logprobs": {"top_logprobs": 2},
    "context_exceeded": {"max_tokens": 5000},
    "stop_empty": {"stop": ["a", ""]},
}
COMPLETION_ERRORS: dict[str, dict[str, Any]] = {
    "prompt_missing": {"prompt": None},
    "n_0": {"n": 0},
    "logprobs_above_max": {"logprobs": 21},
    "max_tokens_0": {"max_tokens": 0},
    "context_exceeded": {"max_tokens": 5000},
}


_INPUT = re.compile(r", 'input': .*?(?=, 'ctx': |\}(?:, \{|\]$))")


def comparable(error: openai.APIStatusError) -> tuple[int, Any]:
    """Status and body; a validation error's echo of the request ('input') is left out, since a gateway that
    re-encodes a body (the toolkit route, a model in the path) sends the same request with its keys reordered."""
    body = error.body
    if isinstance(body, dict) and body.get("type") == "Bad Request":
        body = {**body, "message": _INPUT.sub("", body["message"])}
    return error.status_code, body


def refusal(call: Callable[[], Any]) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value


def _chat_error(client: openai.OpenAI, extra: dict[str, Any]) -> Any:
    return client.chat.completions.create(**{"model": MODEL, "messages": MESSAGES, **extra})


def _cases(aliases: list[Any], cases: dict[str, dict[str, Any]]) -> list[Any]:
    return [pytest.param(a.values[0], case, id=f"{case}-{a.id}") for case in cases for a in aliases]


@pytest.mark.parametrize(("alias", "case"), _cases(CHAT_ALIASES, CHAT_ERRORS))
def test_chat_refusals(setup: Setup, alias: Alias, case: str) -> None:
    extra = CHAT_ERRORS[case]
    if toolkits_own_refusal(setup, alias, case, extra):
        return
    if alias.name == "toolkit" and case == "stream_options_without_stream":
        assert _chat_error(setup.gateway(alias), extra).choices  # the toolkit drops it from a call that does not stream
        return
    engine = refusal(lambda: _chat_error(setup.engine, extra))
    assert isinstance(engine, openai.BadRequestError | openai.NotFoundError)
    gateway = refusal(lambda: _chat_error(setup.gateway(alias), extra))
    assert comparable(gateway) == comparable(engine)
    assert type(gateway) is type(engine)


@pytest.mark.parametrize(("alias", "case"), _cases(COMPLETION_ALIASES, COMPLETION_ERRORS))
def test_completion_refusals(setup: Setup, alias: Alias, case: str) -> None:
    body: dict[str, Any] = {"model": MODEL, "prompt": "one two", **COMPLETION_ERRORS[case]}
    if body["prompt"] is None:
        del body["prompt"]  # the SDK's create() insists on one

    def call(client: openai.OpenAI) -> Any:
        return client.post("/completions", body=body, cast_to=object)

    engine = refusal(lambda: call(setup.engine))
    gateway = refusal(lambda: call(setup.gateway(alias)))
    assert comparable(gateway) == comparable(engine)
    assert type(gateway) is type(engine)


@pytest.mark.parametrize("alias", STREAM_ALIASES)
def test_too_many_logprobs_in_a_stream_is_an_error_event(setup: Setup, alias: Alias) -> None:
    def call(client: openai.OpenAI) -> None:
        stream = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, logprobs=True, top_logprobs=21, stream=True
        )
        for _ in stream:
            pass

    with pytest.raises(openai.APIError) as engine:
        call(setup.engine)
    with pytest.raises(openai.APIError) as gateway:
        call(setup.gateway(alias))
    message = "Requested sample logprobs of 21, which is greater than max allowed: 20"
    assert gateway.value.message == engine.value.message == message


@pytest.mark.parametrize("alias", CHAT_ALIASES)
@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"messages": [{"role": "user", "content": "hi", "extra_field": "0"}]}, id="extra_message_field"),
        pytest.param({"messages": [{"role": "my-custom-role", "content": "hi"}]}, id="custom_role"),
        pytest.param({"temperature": 3}, id="temperature_3"),
        pytest.param({"top_logprobs": 0}, id="top_logprobs_0_without_logprobs"),
    ],
)
def test_what_vllm_accepts_the_gateway_accepts(
    setup: Setup, alias: Alias, extra: dict[str, Any], request: pytest.FixtureRequest
) -> None:
    if toolkits_own_refusal(setup, alias, request.node.callspec.id.split("-")[0], extra):
        return

    def call(client: openai.OpenAI) -> Any:
        return client.chat.completions.create(**{"model": MODEL, "messages": MESSAGES, "max_tokens": 2, **extra})

    engine, gateway = both(setup, alias, call)
    assert same(gateway) == same(engine)


# --- where the gateway answers as LiteLLM's proxy and the toolkit do, not as one engine ---


@pytest.mark.parametrize("alias", [a for a in CHAT_ALIASES if a.id not in {"engines", "deployments"}])
def test_an_unknown_model_is_the_gateways_400_not_the_engines_404(setup: Setup, alias: Alias) -> None:
    """The gateway serves many models: a name it does not serve is LiteLLM's 400 (the toolkit's on its route),
    where one engine answers 404 for a name other than its own. A model in the path is always the one asked for."""
    assert isinstance(refusal(lambda: _chat_error(setup.engine, {"model": "nope"})), openai.NotFoundError)
    refused = refusal(lambda: _chat_error(setup.gateway(alias), {"model": "nope"}))
    assert isinstance(refused, openai.BadRequestError)
    if alias.name == "toolkit":
        assert refused.body == "Invalid Model"  # the SDK shows the body's "error"
    else:
        assert isinstance(refused.body, dict)
        assert refused.body["message"].startswith("Invalid model name passed in model=nope.")
