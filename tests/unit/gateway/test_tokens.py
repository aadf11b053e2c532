"""OpenAI's counting rule on the bundled cl100k_base: expected values worked out by hand from the rule
(3 per message + its values' tokens, +1 per name, +3 for the reply), and loading without any network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiktoken

from orchestrator.gateway.tokens import (
    IMAGE_TOKENS,
    Message,
    Messages,
    encoding,
    message_tokens,
    openai_count,
    prompt_tokens,
)

# The conversation of OpenAI's cookbook ("How to count tokens with tiktoken"), which the OpenAI API itself
# counts as 129 prompt tokens on gpt-4-0613 and gpt-3.5-turbo (both cl100k_base).
COOKBOOK = (
    Message(
        "system",
        "You are a helpful, pattern-following assistant that translates corporate jargon into plain English.",
    ),
    Message("system", "New synergies will help drive top-line growth.", name="example_user"),
    Message("system", "Things working well together will increase revenue.", name="example_assistant"),
    Message(
        "system",
        "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage.",
        name="example_user",
    ),
    Message("system", "Let's talk later when we're less busy about how to do better.", name="example_assistant"),
    Message("user", "This late pivot means we don't have time to boil the ocean for the client deliverable."),
)


@pytest.fixture(scope="module")
def enc() -> tiktoken.Encoding:
    return encoding()


def test_the_bundled_data_is_cl100k(enc: tiktoken.Encoding) -> None:
    # Known cl100k_base ids; the words the hand counts below rely on are one token each.
    assert enc.encode_ordinary("hello world") == [15339, 1917]
    assert [len(enc.encode_ordinary(w)) for w in ("hello", "user", "system", "assistant")] == [1, 1, 1, 1]
    assert enc.n_vocab == 100277


def test_one_message(enc: tiktoken.Encoding) -> None:
    # 3 (message) + 1 ("user") + 1 ("hello") + 3 (reply)
    assert message_tokens(enc, [Message("user", "hello")]) == 8


def test_a_name_costs_its_tokens_and_one_more(enc: tiktoken.Encoding) -> None:
    # 8 as above + 1 ("hello" as the name) + 1 (per name)
    assert message_tokens(enc, [Message("user", "hello", name="hello")]) == 10


def test_several_messages(enc: tiktoken.Encoding) -> None:
    # (3 + 1 + 1) + (3 + 1 + 2) + (3 + 1 + 0) + 3: system "hello", user "hello world", assistant with no content
    messages = [Message("system", "hello"), Message("user", "hello world"), Message("assistant", None)]
    assert message_tokens(enc, messages) == 18


def test_the_cookbook_conversation_counts_as_the_openai_api_does(enc: tiktoken.Encoding) -> None:
    assert message_tokens(enc, COOKBOOK) == 129


def test_list_content_counts_text_parts_and_a_fixed_amount_per_image(enc: tiktoken.Encoding) -> None:
    # 3 + 1 ("user") + 1 + 2 (the two text parts) + 3
    assert message_tokens(enc, [Message("user", ("hello", "hello world"))]) == 10
    assert message_tokens(enc, [Message("user", ("hello",), images=2)]) == 8 + 2 * IMAGE_TOKENS
    assert message_tokens(enc, [Message("user", ())]) == 7


def test_prompts(enc: tiktoken.Encoding) -> None:
    assert prompt_tokens(enc, "hello world") == 2
    assert prompt_tokens(enc, ("hello", "hello world")) == 3
    assert prompt_tokens(enc, "") == 0


def test_special_token_text_is_plain_text(enc: tiktoken.Encoding) -> None:
    # tiktoken's encode() would refuse it (ValueError); as text it is several tokens, never the one special token.
    assert prompt_tokens(enc, "<|endoftext|>") > 1
    assert message_tokens(enc, [Message("user", "<|endoftext|>")]) == 7 + prompt_tokens(enc, "<|endoftext|>")


def test_openai_count_takes_either_source() -> None:
    assert openai_count(Messages((Message("user", "hello"),))) == 8
    assert openai_count("hello world") == 2
    assert openai_count(("hello", "hello")) == 2


def test_the_encoding_loads_with_no_network_and_no_cache(tmp_path: Path) -> None:
    """A fresh interpreter with every socket refused and an empty tiktoken cache still counts."""
    script = """
import socket

def refuse(*args, **kwargs):
    raise OSError("network is not allowed here")

socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.getaddrinfo = refuse
socket.create_connection = refuse

from orchestrator.gateway.tokens import Message, Messages, openai_count
print(openai_count(Messages((Message("user", "hello"),))))
"""
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache")}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "8"
