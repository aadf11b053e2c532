"""Constant load through the gateway: callers with the official openai client, each calling again at once until
told to stop, half of them streaming; what a test of a fleet that changes under traffic asserts on."""

from __future__ import annotations

import asyncio

import openai
from openai.types.chat import ChatCompletionMessageParam

ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say something"}]


async def call_until(
    sdk: openai.AsyncOpenAI, model: str, stop: asyncio.Event, *, callers: int, max_tokens: int = 10
) -> tuple[int, list[BaseException]]:
    """`callers` callers, every other one streaming, each calling again at once until `stop`: (answers, failures).
    An answer counts when it ends for its length, whole or streamed; anything else is a failure."""
    answered, failed = 0, list[BaseException]()

    async def caller(stream: bool) -> None:
        nonlocal answered
        while not stop.is_set():
            try:
                if stream:
                    chunks = await sdk.chat.completions.create(
                        model=model, messages=ASK, max_tokens=max_tokens, stream=True
                    )
                    assert [c async for c in chunks][-1].choices[0].finish_reason == "length"
                else:
                    reply = await sdk.chat.completions.create(model=model, messages=ASK, max_tokens=max_tokens)
                    assert reply.choices[0].finish_reason == "length"
                answered += 1
            except (openai.OpenAIError, AssertionError) as e:
                failed.append(e)

    await asyncio.gather(*(caller(i % 2 == 1) for i in range(callers)))
    return answered, failed
