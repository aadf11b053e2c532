"""Replica endpoints: the toolkit's full chat URL and a plain base URL both name the same OpenAI API root."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

_SUFFIXES = ("/chat/completions", "/completions")


@dataclass(frozen=True)
class EngineUrls:
    origin: str
    """`http://host:port`: where vLLM serves `/health`, `/metrics` and `/tokenize`."""
    api_base: str
    """The OpenAI root, e.g. `http://host:port/v1`: `/chat/completions`, `/completions`, `/models` hang off it."""


def engine_urls(endpoint: str) -> EngineUrls:
    """`http://h:8000/v1/chat/completions`, `http://h:8000/v1/` and `http://h:8000` all give `http://h:8000/v1`."""
    parts = urlsplit(endpoint.strip())
    origin = f"{parts.scheme}://{parts.netloc}"
    path = parts.path.rstrip("/")
    for suffix in _SUFFIXES:
        if path.endswith(suffix):
            path = path[: -len(suffix)].rstrip("/")
            break
    if not path.endswith("/v1"):
        path = f"{path}/v1"
    return EngineUrls(origin=origin, api_base=origin + path)


def external_api_base(uri: str) -> str:
    """An external endpoint's OpenAI root: its URI less a trailing `/chat/completions` or `/completions`.

    Unlike a replica's, no `/v1` is added: an external API's root is whatever its owner publishes."""
    base = uri.strip().rstrip("/")
    for suffix in _SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)].rstrip("/")
    return base


def is_http_url(url: str) -> bool:
    """An absolute http(s) URL with a host and a valid port, printable and without whitespace: one that can be
    called (a replica's endpoint, an llm_endpoint's URI)."""
    if not url.isprintable() or any(c.isspace() for c in url):
        return False
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on a port that is not a number in range)
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
