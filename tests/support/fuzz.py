"""The machinery of the schema-driven fuzzing (tests/integration/test_fuzz_openapi.py, test_fuzz_gateway.py): odd
values, JSON schemas to Hypothesis strategies, near-valid mutations, the operations of an OpenAPI schema, the checks
of each surface's envelope, and the driver that sends each example into the test's own event loop."""

from __future__ import annotations

import asyncio
import copy
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

import httpx
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from tests.support.settings import ADMIN_KEY

Strategy = st.SearchStrategy[Any]

# -- values ----------------------------------------------------------------------------------------

NUL = "\x00"  # PostgreSQL's text cannot hold one: each route must refuse it, or store it some other way

ODD_STRINGS = [
    "",
    " ",
    "0",
    "-1",
    "2147483648",
    "1e309",
    "NaN",
    "null",
    "true",
    "[]",
    "{}",
    "../../etc/passwd",
    "%00",
    "%ff",
    "a%2Fb",
    NUL,
    "a\x00b",
    "\x01",
    "\ufeff",
    "\U0001f600",
    "é" * 300,
    "x" * 5000,
    "<script>",
    "'; DROP TABLE api_key; --",
    "\\ud800",
]
ODD_TEXT = st.sampled_from(ODD_STRINGS) | st.text(max_size=30)
JSON: Strategy = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | ODD_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=20), inner, max_size=5),
    max_leaves=12,
)
# A value of each JSON type, for "the same field with the wrong type".
RETYPED = [None, True, 0, -1, 2**63, 1.5, "", "x", [], {}, [1], {"a": 1}]
BAD_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"]
JSON_TYPE = "application/json"
ODD_CONTENT_TYPES = [
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/msgpack",
    "application/json; charset=utf-16",
    "application/vnd.api+json",
    "",
]


def not_json_bodies(field_name: str) -> list[tuple[bytes, str]]:
    """Bodies that are not a JSON document, or not one in UTF-8, each with the content type it is sent as."""
    key = field_name.encode()
    return [
        (b"\xff\xfe\x00", JSON_TYPE),
        (b'{"' + key + b'": "\\ud800"}', JSON_TYPE),  # a lone surrogate, escaped
        (b"\xef\xbb\xbf{}", JSON_TYPE),  # a byte-order mark
        (b"not json", JSON_TYPE),
        (b"", JSON_TYPE),
        (b"{", JSON_TYPE),
        (b"[" * 5000, JSON_TYPE),
        (b"1e999", JSON_TYPE),
        (b'{"' + key + b'": 1, "' + key + b'": "x"}', JSON_TYPE),  # a duplicate key
        (key + b"=x", "application/x-www-form-urlencoded"),
        (
            b'--x\r\nContent-Disposition: form-data; name="' + key + b'"\r\n\r\nx\r\n--x--\r\n',
            "multipart/form-data; boundary=x",
        ),
        (b"\x81\xa4name\xa1x", "application/msgpack"),
        ('{"x": "é"}'.encode("utf-16"), "application/json; charset=utf-16"),
        (b"{}", "text/plain"),
        (b"{}", ""),
    ]


def undecodable_json(field_name: str, valid: Mapping[str, Any] | None = None) -> list[tuple[bytes, str]]:
    """JSON that msgspec does not refuse with its own DecodeError: bytes that are not UTF-8 inside a string
    (UnicodeDecodeError) and nesting past its recursion limit (RecursionError). With a `valid` body, that body with
    an unknown field holding them too: a typed decoder skips over an unknown field's bytes, an untyped one does not."""
    key = field_name.encode()
    deep = b"[" * 3000 + b"]" * 3000
    bodies = [b'{"' + key + b'": "' + bad + b'"}' for bad in BAD_UTF8]
    bodies.append(b'{"deep": ' + deep + b"}")  # a field no route knows
    if valid:
        opened = json.dumps(valid).encode()[:-1]
        bodies += [opened + b', "unknown": "' + bad + b'"}' for bad in BAD_UTF8]
        bodies.append(opened + b', "unknown": ' + deep + b"}")
    return [(body, JSON_TYPE) for body in bodies]


# -- schemas -> strategies --------------------------------------------------------------------------


def resolve(node: Any, components: Mapping[str, Any], seen: tuple[str, ...] = ()) -> Any:
    """`node` with every `{"$ref": "#/components/schemas/X"}` replaced by X (resolved too); a cycle is an error."""
    if isinstance(node, list):
        return [resolve(item, components, seen) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if ref is None:
        return {key: resolve(value, components, seen) for key, value in node.items()}
    name = str(ref).removeprefix("#/components/schemas/")
    assert name != ref, f"only local component references are resolved: {ref}"
    assert name not in seen, f"recursive schema: {' -> '.join((*seen, name))}"
    siblings = {key: resolve(value, components, seen) for key, value in node.items() if key != "$ref"}
    return {**resolve(components[name], components, (*seen, name)), **siblings}


def _has_object(schema: Any) -> bool:
    if isinstance(schema, list):
        return any(_has_object(item) for item in schema)
    if not isinstance(schema, dict):
        return False
    return schema.get("type") == "object" or "properties" in schema or any(_has_object(v) for v in schema.values())


def from_body_schema(schema: Mapping[str, Any]) -> Strategy:
    """Values valid against a resolved schema: objects and arrays of objects built here, every leaf by from_schema."""
    if not _has_object(schema):
        return from_schema(dict(schema))
    for combinator in ("oneOf", "anyOf"):
        if combinator in schema:
            siblings = {k: v for k, v in schema.items() if k != combinator}
            return st.one_of([from_body_schema({**siblings, **branch}) for branch in schema[combinator]])
    if schema.get("type") == "array":
        return st.lists(
            from_body_schema(schema.get("items", {})),
            min_size=int(schema.get("minItems", 0)),
            max_size=min(int(schema.get("maxItems", 3)), 3),
        )
    properties: dict[str, Any] = schema.get("properties", {})
    if not properties:
        return st.dictionaries(st.text(max_size=20), JSON, max_size=4)
    required = set(schema.get("required", ()))
    return st.fixed_dictionaries(
        {name: from_body_schema(sub) for name, sub in properties.items() if name in required},
        optional={name: from_body_schema(sub) for name, sub in properties.items() if name not in required},
    )


def _spots(doc: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The path of every value in a JSON document, the document itself first."""
    yield at
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _spots(value, (*at, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield from _spots(value, (*at, index))


@st.composite
def near_valid(draw: st.DrawFn, valid: Strategy) -> Any:
    """A valid document with one thing wrong, anywhere in it: a value replaced by random JSON or by one of another
    type, a field or an item dropped, an unknown field added to an object, or a value wrapped in a list."""
    doc = copy.deepcopy(draw(valid))
    at = draw(st.sampled_from(list(_spots(doc))))
    how = draw(st.sampled_from(["replace", "retype", "drop", "extra"]))
    if not at:
        return draw(JSON) if how in {"replace", "drop"} else draw(st.sampled_from(RETYPED))
    parent = doc
    for step in at[:-1]:
        parent = parent[step]
    last = at[-1]
    value = parent[last]
    if how == "replace":
        parent[last] = draw(JSON)
    elif how == "retype":
        parent[last] = draw(st.sampled_from([v for v in RETYPED if type(v) is not type(value)]))
    elif how == "drop":
        del parent[last]
    elif isinstance(value, dict):
        value[draw(st.text(max_size=20))] = draw(JSON)
    else:
        parent[last] = [value]
    return doc


BodyKind = Literal["valid", "near-valid", "junk"]


def body_strategy(
    schema: Mapping[str, Any] | None, examples: list[Any], kind: BodyKind, *, undecodable: bool = True
) -> st.SearchStrategy[tuple[bytes, str]]:
    """(body, content type): valid, near-valid, or junk (random JSON, and bytes that are not JSON; `undecodable`:
    with the JSON that msgspec does not refuse as such)."""
    if kind == "junk":
        name = next(iter(sorted(schema.get("properties", {}))), "x") if schema is not None else "x"
        bad = not_json_bodies(name) + (undecodable_json(name) if undecodable else [])
        odd_bytes = st.tuples(st.binary(max_size=64), st.sampled_from([JSON_TYPE, *ODD_CONTENT_TYPES]))
        return st.one_of(_encoded(JSON), st.sampled_from(bad), odd_bytes)
    valid = from_body_schema(schema) if schema is not None else JSON
    if examples:
        valid = st.sampled_from(examples) | valid
    return _encoded(valid if kind == "valid" else near_valid(valid))


def _encoded(docs: Strategy) -> st.SearchStrategy[tuple[bytes, str]]:
    """Documents as JSON, ASCII-escaped or in UTF-8, mostly as application/json (which no route insists on)."""
    content_type = st.sampled_from([JSON_TYPE] * 14 + ODD_CONTENT_TYPES)
    return st.tuples(docs, st.booleans(), content_type).map(
        lambda t: (json.dumps(t[0], ensure_ascii=t[1]).encode(), t[2])
    )


# -- the operations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    params: tuple[dict[str, Any], ...]
    body_schema: dict[str, Any] | None
    body_ref: str | None
    """The component the body is (`ReplicaIn`), for hand-written examples."""
    takes_body: bool
    tags: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.method} {self.path}"

    def concrete_path(self, **values: str) -> str:
        """The path with every parameter filled in: from `values`, else 1 for an integer and `x` for text."""
        path = self.path
        for p in self.params:
            default = "1" if p.get("schema", {}).get("type") == "integer" else "x"
            path = path.replace("{" + p["name"] + "}", quote(values.get(p["name"], default), safe=""))
        return path


def operations(schema: Mapping[str, Any]) -> list[Operation]:
    components = schema.get("components", {}).get("schemas", {})
    ops = []
    for path, item in schema["paths"].items():
        for method, op in item.items():
            if method not in {"get", "post", "put", "delete", "patch"}:
                continue
            media = op.get("requestBody", {}).get("content", {}).get(JSON_TYPE)
            ref = media["schema"].get("$ref") if media else None
            ops.append(
                Operation(
                    method=method.upper(),
                    path=path,
                    params=tuple(resolve(p, components) for p in op.get("parameters", ())),
                    body_schema=resolve(media["schema"], components) if media else None,
                    body_ref=ref.rsplit("/", 1)[-1] if ref else None,
                    takes_body=method in {"post", "put", "patch"},
                    tags=tuple(op.get("tags", ())),
                )
            )
    # Destructive operations last, so the others meet the seeded rows.
    return sorted(ops, key=lambda o: o.method == "DELETE" or re.search(r"delete|reset", o.path) is not None)


@dataclass(frozen=True, repr=False)
class Call:
    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        content = self.content if self.content is None or len(self.content) <= 300 else self.content[:300] + b"..."
        return f"Call({self.method} {self.path[:300]} params={self.params} headers={self.headers} content={content!r})"


def _query_value(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    return value if isinstance(value, str) else json.dumps(value)


def param_strategy(param: Mapping[str, Any], known: list[Any]) -> Strategy:
    valid = from_body_schema(param.get("schema", {}))
    if known:
        valid = valid | st.sampled_from(known)
    return st.one_of(valid, valid, ODD_TEXT, st.integers(min_value=-(2**64), max_value=2**64))


def authorizations(*client_keys: str) -> list[str | None]:
    """`Authorization` headers to send, mostly the admin's: the admin key, client keys, none, and wrong ones."""
    admin = f"Bearer {ADMIN_KEY}"
    return [admin] * 6 + [f"Bearer {k}" for k in client_keys] + [None, "Bearer sk-not-a-key", ADMIN_KEY]


def call_strategy(
    op: Operation, known_ids: list[Any], examples: list[Any], auths: list[str | None], kind: BodyKind
) -> st.SearchStrategy[Call]:
    path_params = [p for p in op.params if p.get("in") == "path"]
    query_params = [p for p in op.params if p.get("in") == "query"]

    @st.composite
    def build(draw: st.DrawFn) -> Call:
        path = op.path
        for p in path_params:
            value = draw(param_strategy(p, known_ids))
            path = path.replace("{" + p["name"] + "}", quote(str(_query_value(value)), safe=""))
        params = {}
        for p in query_params:
            if draw(st.booleans()):
                value = _query_value(draw(param_strategy(p, [])))
                if value is not None:
                    params[p["name"]] = value
        if draw(st.integers(0, 9)) == 0:
            params[draw(st.text(min_size=1, max_size=10))] = draw(ODD_TEXT)
        auth = draw(st.sampled_from(auths))
        headers = {} if auth is None else {"Authorization": auth}
        content = None
        if op.takes_body:
            content, content_type = draw(body_strategy(op.body_schema, examples, kind))
            if content_type:
                headers["Content-Type"] = content_type
        return Call(op.method, path, params, content, headers)

    return build()


# -- answers ---------------------------------------------------------------------------------------


def is_openai_error(body: Any) -> bool:
    """LiteLLM's (OpenAI's) envelope: `{"error": {"message", "type", "param", "code"}}`."""
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and {"message", "type", "param", "code"} == set(error)


def is_toolkit_error(body: Any) -> bool:
    """The toolkit's: marshmallow's `{"errors": {field: [message]}}`, or `{"error"|"message": message}`."""
    if not isinstance(body, dict) or len(body) != 1:
        return False
    [(key, value)] = body.items()
    if key == "errors":
        return isinstance(value, dict) and bool(value)
    return key in {"error", "message"} and isinstance(value, str)


def is_llmendpoint_error(body: Any) -> bool:
    """LlmEndpoint's: `{"success": false, "message", "detail"?}`."""
    return (
        isinstance(body, dict)
        and body.get("success") is False
        and isinstance(body.get("message"), str)
        and set(body) <= {"success", "message", "detail"}
    )


def is_connector_answer(body: Any, *, failed: bool) -> bool:
    """The connector's: `{"success": true, "data": ...}`, `{"success": false, "data": "<message>"}`."""
    return (
        isinstance(body, dict)
        and set(body) == {"success", "data"}
        and body["success"] is not failed
        and (not failed or isinstance(body["data"], str))
    )


def is_moonshot_error(body: Any) -> bool:
    """Moonshot's: `{"error": [message, ...]}` for a bad body, `{"detail": message}` for a 404."""
    if not isinstance(body, dict) or len(body) != 1:
        return False
    [(key, value)] = body.items()
    if key == "error":  # a list from its own handlers; a string from the admin guard's 401
        return isinstance(value, str) or (isinstance(value, list) and all(isinstance(m, str) for m in value))
    return key == "detail" and isinstance(value, str)


TOOLKIT_TAGS = {"api keys", "tables", "models", "replicas"}
# What the app answers a path no route matches, or a method no route of the path takes (the connector's paths
# get them in the connector's envelope).
ROUTING_REFUSALS = [{"error": "Not Found"}, {"error": "Method Not Allowed"}]


def surface(op: Operation) -> str:
    tags = set(op.tags)
    if tags & TOOLKIT_TAGS:
        return "toolkit"
    if any(t.startswith("connector") for t in tags):
        return "feishu" if op.path.startswith("/bot/") else "connector"
    return next(iter(sorted(tags & {"litellm", "moonshot", "llmendpoint"})), "other")


def check_envelope(op: Operation, r: httpx.Response) -> None:
    """The answer is JSON in the shape of the surface `op` belongs to (a surface known by its tags)."""
    if r.status_code == 204 or op.path == "/metrics":
        return
    assert r.headers.get("content-type", "").startswith(JSON_TYPE), r.headers
    body = r.json()
    failed = r.status_code >= 400
    kind = surface(op)
    if kind not in {"connector", "feishu"} and body in ROUTING_REFUSALS:
        return  # the filled-in path left the operation's template and matched no route: the app's own answer
    if kind == "connector" or (kind == "feishu" and failed):  # Feishu's own callbacks are answered its way
        assert is_connector_answer(body, failed=failed), body
    elif not failed:
        return
    elif kind == "toolkit":
        assert is_toolkit_error(body), body
    elif kind == "litellm":
        assert is_openai_error(body), body
    elif kind == "moonshot":
        assert is_moonshot_error(body), body
    elif kind == "llmendpoint":
        assert is_llmendpoint_error(body), body
    else:
        assert isinstance(body, dict), body


def check_answer(op: Operation, call: Call, r: httpx.Response) -> None:
    where = f"{call} -> {r.status_code} {r.text[:500]}"
    # No operation of the schema answers a 5xx on purpose: none of them proxies to a replica (the token counter
    # counts by itself when a replica does not answer), so every 5xx here is a bug.
    assert r.status_code < 500, where
    assert "Traceback" not in r.text, where
    try:
        check_envelope(op, r)
    except (AssertionError, ValueError) as e:
        raise AssertionError(f"{where}: {e}") from e


# -- the driver ------------------------------------------------------------------------------------


Send = Callable[[Call], httpx.Response]


def sender(anon_client: httpx.AsyncClient, loop: asyncio.AbstractEventLoop) -> Send:
    """A synchronous send (for Hypothesis's thread) into the loop the app runs in; the call brings its headers."""

    def send(call: Call) -> httpx.Response:
        request = anon_client.request(
            call.method, call.path, params=call.params, content=call.content, headers=call.headers
        )
        try:
            return asyncio.run_coroutine_threadsafe(request, loop).result(timeout=60)
        except Exception as e:  # what escapes the app: behind a server, a 500 (or a dropped connection)
            raise AssertionError(f"{call} -> the app raised {e!r}") from e

    return send


def explore(calls: st.SearchStrategy[Call], check: Callable[[Call], None], max_examples: int) -> None:
    """Run `check` on `max_examples` calls, the same ones every run."""

    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: the app's state moves, and the call is reported
        suppress_health_check=list(HealthCheck),
    )
    @given(calls)
    def run(call: Call) -> None:
        check(call)

    run()
