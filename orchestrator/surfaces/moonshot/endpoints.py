"""Moonshot's llm_endpoints: external OpenAI-compatible APIs saved under the slug of their name, their tokens
sealed at rest and masked on every read. Every change reaches the gateway's memory before the call returns."""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import structlog

from orchestrator.domain.errors import InvalidInput, NotFound
from orchestrator.gateway.engine_urls import is_http_url
from orchestrator.platform.outbound import OutboundPolicy
from orchestrator.platform.secrets import MASK, SecretBox
from orchestrator.store.external_endpoints import ExternalEndpointStore
from orchestrator.store.tables import ExternalEndpoint

log = structlog.get_logger(__name__)

CONNECTOR_TYPES = (
    "hf-llama2-13b-gptq",
    "openai-gpt4",
    "claude2",
    "openai-gpt35",
    "openai-gpt35-turbo-16k",
    "hf-gpt2",
    "vllm",
    "openai-compatible",
)
"""Moonshot's connectors, then ours. Every one is called the same way: an OpenAI-compatible API at the URI."""

RESERVED_PARAMS = frozenset({"messages", "prompt", "stream"})
"""Keys of the request itself: an endpoint's default params never override them. (`model` may be set: it names the
model at the external API, which replaces the endpoint's id the client called it by.)"""
MAX_NAME = 255
MAX_ID = 255
MAX_PARAMS_CHARS = 16 * 1024
"""Of the params as stored (compact JSON)."""
MAX_URI = 2048
MAX_TOKEN = 4096
MAX_RATE = 100_000
"""Upper bound of max_calls_per_second and max_concurrency (0 is unlimited)."""

_NOT_ALNUM = re.compile(r"[^a-z0-9]+")
_TOKEN = re.compile(r"[\x21-\x7e]*")


@dataclass(frozen=True)
class EndpointSpec:
    name: str
    connector_type: str
    uri: str
    token: str
    max_calls_per_second: int
    max_concurrency: int
    params: dict[str, Any]


@dataclass(frozen=True)
class EndpointView:
    id: str
    connector_type: str
    name: str
    uri: str
    token: str
    """MASK when a token is set, "" when none: never the token."""
    max_calls_per_second: int
    max_concurrency: int
    params: dict[str, Any]


def endpoint_id(name: str) -> str:
    """`My EP_1` -> `my-ep-1`: accents dropped, lower case, every run of other characters one `-`, none at the ends.

    Empty when the name has no ASCII letter or digit."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    return _NOT_ALNUM.sub("-", ascii_name.lower()).strip("-")


class ExternalEndpointService:
    def __init__(
        self,
        store: ExternalEndpointStore,
        box: SecretBox,
        on_change: Callable[[], Awaitable[None]],
        *,
        outbound: OutboundPolicy,
    ) -> None:
        self._store = store
        self._outbound = outbound
        self._box = box
        self._on_change = on_change

    async def endpoints(self) -> list[EndpointView]:
        return [_view(e) for e in await self._store.endpoints()]

    async def save(self, spec: EndpointSpec) -> str:
        """Add the endpoint, or overwrite the one whose name has the same slug; returns its id."""
        new_id = _checked_id(spec.name)
        _check(spec)
        await self._outbound.check("uri", spec.uri)
        params = _params_json(spec.params)
        kept = spec.token == MASK
        if kept:
            sealed = await self._kept_token(new_id, spec.uri)
        else:
            sealed = self._box.seal(spec.token) if spec.token else ""
        row = ExternalEndpoint(
            id=new_id,
            name=spec.name,
            connector_type=spec.connector_type,
            uri=spec.uri,
            token_sealed=sealed,
            max_calls_per_second=spec.max_calls_per_second,
            max_concurrency=spec.max_concurrency,
            params=params,
        )
        await self._store.save(row)
        log.info("llm_endpoint.saved", endpoint_id=new_id, connector_type=spec.connector_type, token_kept=kept)
        await self._on_change()
        return new_id

    async def delete(self, name_or_id: str) -> None:
        """By id or by name: either gives the same slug, whatever its case."""
        wanted = endpoint_id(name_or_id)
        if not wanted or len(wanted) > MAX_ID or not await self._store.delete(wanted):
            raise NotFound(f"no endpoint with id '{wanted or name_or_id}'")
        log.info("llm_endpoint.deleted", endpoint_id=wanted)
        await self._on_change()

    async def _kept_token(self, endpoint: str, uri: str) -> str:
        """The stored token, sealed, for a save that sent the mask back; only to the host it was meant for."""
        old = await self._store.endpoint(endpoint)
        if old is None:
            raise InvalidInput("token", f"token {MASK} is the mask of a stored token: send the token itself")
        if _origin(old.uri) != _origin(uri):
            raise InvalidInput("token", "token must be sent again (not its mask) when the uri's host changes")
        return old.token_sealed


def _checked_id(name: str) -> str:
    if not 1 <= len(name) <= MAX_NAME:
        raise InvalidInput("name", f"name must be 1 to {MAX_NAME} characters")
    if not name.isprintable():
        raise InvalidInput("name", "name must not contain control characters")
    new_id = endpoint_id(name)
    if not new_id:
        raise InvalidInput("name", "name must contain a letter or a digit (the endpoint's id is its slug)")
    if len(new_id) > MAX_ID:
        raise InvalidInput("name", f"name gives an id longer than {MAX_ID} characters")
    return new_id


def _check(spec: EndpointSpec) -> None:
    if spec.connector_type not in CONNECTOR_TYPES:
        raise InvalidInput("connector_type", f"connector_type must be one of: {', '.join(CONNECTOR_TYPES)}")
    if len(spec.uri) > MAX_URI or not is_http_url(spec.uri):
        raise InvalidInput("uri", "uri must be an http:// or https:// URL with a host")
    if urlsplit(spec.uri).username is not None:  # it would be listed in clear: a secret belongs in `token`
        raise InvalidInput("uri", "uri must not hold credentials (user:password@): put the secret in token")
    if len(spec.token) > MAX_TOKEN:
        raise InvalidInput("token", f"token must be at most {MAX_TOKEN} characters")
    if not _TOKEN.fullmatch(spec.token):
        # It is sent in an HTTP header: anything else would fail every call, not this save.
        raise InvalidInput("token", "token must be printable ASCII without spaces")
    for field in ("max_calls_per_second", "max_concurrency"):
        value = getattr(spec, field)
        if not 0 <= value <= MAX_RATE:  # the schema says so too; the column is a 32-bit integer
            raise InvalidInput(field, f"{field} must be between 0 (unlimited) and {MAX_RATE}")


def _params_json(params: dict[str, Any]) -> str:
    reserved = sorted(RESERVED_PARAMS.intersection(params))
    if reserved:
        raise InvalidInput("params", f"params must not set {', '.join(reserved)}: the request itself does")
    try:
        text = json.dumps(params, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidInput("params", "params must be a JSON object") from e
    if len(text) > MAX_PARAMS_CHARS:
        raise InvalidInput("params", f"params must be at most {MAX_PARAMS_CHARS} characters of JSON")
    return text


def _origin(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    return parts.scheme.lower(), parts.netloc.lower()


def _view(e: ExternalEndpoint) -> EndpointView:
    return EndpointView(
        id=e.id,
        connector_type=e.connector_type,
        name=e.name,
        uri=e.uri,
        token=MASK if e.token_sealed else "",
        max_calls_per_second=e.max_calls_per_second,
        max_concurrency=e.max_concurrency,
        params=json.loads(e.params),
    )
