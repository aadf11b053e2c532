"""What a completion request will generate, after vLLM's serving checks: the prompt, each choice, and how it ends.

The checks run in vLLM's order: the model (404), the tool choice, the prompt against the context (a chat's
preprocessing errors end with " None", vLLM's `f"{e} {e.__cause__}"`), then the sampling parameters. A request
that names no length ends where the simulated model stops by itself (`natural`, the `--max-tokens` knob), with
finish reason "stop"; one that names it generates exactly that many tokens and ends with "length".
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.enginesim.bodies import (
    COMPLETION_MAX_TOKENS,
    ChatRequest,
    CompletionRequest,
    Refusal,
    prompts,
    sampling_problem,
)
from orchestrator.enginesim.outputs import Answer, Output, generate
from orchestrator.enginesim.text import chat_tokens, completion_prompt_ids


@dataclass(frozen=True)
class Limits:
    model: str
    max_model_len: int
    natural: int  # tokens the simulated model generates before it stops by itself
    max_logprobs: int  # -1: no limit


@dataclass
class Plan:
    answer: Answer
    stream: bool
    json_object: bool
    engine_error: str | None  # refused once generating: 400, or an error event in a stream already started
    fast: bool  # a single plain choice: the pre-encoded path serves it

    @property
    def prompt(self) -> int:
        return self.answer.prompt_tokens

    @property
    def completion(self) -> int:
        return self.answer.completion_tokens


def unknown_model(model: str) -> Refusal:
    return Refusal(404, "NotFoundError", f"The model `{model}` does not exist.")


def _truncated(prompt: int, truncate: int | None, limits: Limits, suffix: str) -> int:
    if truncate is None:
        return prompt
    if truncate > limits.max_model_len:
        raise Refusal.bad_request(
            f"truncate_prompt_tokens value ({truncate}) is greater than max_model_len ({limits.max_model_len}). "
            f"Please, select a smaller truncation size.{suffix}"
        )
    return min(prompt, truncate)  # vLLM keeps the prompt's last k tokens


def _fit(prompt: int, requested: int | None, limits: Limits, suffix: str) -> int:
    """The most tokens the request may generate (vLLM's get_max_tokens), after its context check."""
    limit = limits.max_model_len
    if requested is None:
        if prompt >= limit:
            raise Refusal.bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested {prompt} tokens "
                f"in the messages, Please reduce the length of the messages.{suffix}"
            )
        return limit - prompt
    if prompt + requested > limit:
        raise Refusal.bad_request(
            f"This model's maximum context length is {limit} tokens. However, you requested {prompt + requested} "
            f"tokens ({prompt} in the messages, {requested} in the completion). "
            f"Please reduce the length of the messages or completion.{suffix}"
        )
    return min(limit - prompt, requested)


def _length(max_tokens: int, named: bool, ignore_eos: bool, limits: Limits) -> tuple[int, str]:
    if named or ignore_eos or limits.natural >= max_tokens:
        return max_tokens, "length"
    return limits.natural, "stop"


def _too_many_logprobs(k: int | None, limits: Limits) -> str | None:
    if k is None or limits.max_logprobs == -1 or (k != -1 and k <= limits.max_logprobs):
        return None
    return f"Requested sample logprobs of {k}, which is greater than max allowed: {limits.max_logprobs}"


def _plan(
    req: ChatRequest | CompletionRequest,
    prompt: int,
    choices: list[tuple[int, int, str, str]],
    *,
    chat: bool,
    limits: Limits,
) -> Plan:
    """`choices`: (index, tokens, finish reason, echoed prefix) of each output."""
    outputs: list[Output] = []
    for index, count, finish, prefix in choices:
        output = generate(
            index,
            count,
            start=index,
            json_object=req.json_object,
            stops=req.stops,
            include_stop=req.include_stop_str_in_output,
            finish=finish,
        )
        output.prefix = prefix
        outputs.append(output)
    logprobs = req.sample_logprobs
    answer = Answer(chat, prompt, outputs, logprobs, req.usage_chunk, req.continuous_usage)
    plain = len(outputs) == 1 and not req.stops and logprobs is None and not outputs[0].prefix
    return Plan(
        answer,
        stream=bool(req.stream),
        json_object=req.json_object,
        engine_error=_too_many_logprobs(logprobs, limits),
        fast=plain and not req.continuous_usage,
    )


def chat_plan(req: ChatRequest, limits: Limits) -> Plan:
    if req.model is not None and req.model != limits.model:
        raise unknown_model(req.model)
    if req.tool_choice == "auto":
        raise Refusal.bad_request(
            '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
        )
    prompt = _truncated(chat_tokens(req), req.truncate_prompt_tokens, limits, " None")
    requested = req.requested_tokens
    max_tokens = _fit(prompt, requested, limits, " None")
    if (problem := sampling_problem(req, max_tokens)) is not None:
        raise Refusal.bad_request(problem)
    count, finish = _length(max_tokens, requested is not None, req.ignore_eos, limits)
    n = req.n or 1
    return _plan(req, prompt, [(i, count, finish, "") for i in range(n)], chat=True, limits=limits)


def completion_plan(req: CompletionRequest, limits: Limits) -> Plan:
    if req.model is not None and req.model != limits.model:
        raise unknown_model(req.model)
    if req.suffix is not None:
        raise Refusal.bad_request("suffix is not currently supported")
    texts = prompts(req.prompt)
    counts = [_truncated(len(ids), req.truncate_prompt_tokens, limits, "") for ids in completion_prompt_ids(req.prompt)]
    requested = req.requested_tokens
    fits = [_fit(count, requested, limits, "") for count in counts]
    if (problem := sampling_problem(req, fits[0] if fits else COMPLETION_MAX_TOKENS)) is not None:
        raise Refusal.bad_request(problem)
    n = req.n or 1
    choices = []
    for p, (text, max_tokens) in enumerate(zip(texts, fits, strict=True)):
        count, finish = _length(max_tokens, isinstance(req.max_tokens, int), req.ignore_eos, limits)
        prefix = text if req.echo and isinstance(text, str) else ""
        choices += [(p * n + j, count, finish, prefix) for j in range(n)]
    return _plan(req, sum(counts), choices, chat=False, limits=limits)
