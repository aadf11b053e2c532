"""What /schema serves: Litestar's document of its routes completed with the raw routes' (raw_routes.py), as JSON,
as YAML, and as the Swagger UI and ReDoc pages, which load their files from this server (assets.py).

Litestar builds its document from its own routes only, and builds it once, at the first page asked for (it takes
about half a second: not at every app's start). Each render plugin here hands the plugin it wraps that document
completed, made once from Litestar's and kept.
"""

from __future__ import annotations

import copy
from typing import Any

from litestar import Request
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import (
    JsonRenderPlugin,
    OpenAPIRenderPlugin,
    RedocRenderPlugin,
    SwaggerRenderPlugin,
    YamlRenderPlugin,
)
from litestar.router import Router

from api.openapi.assets import DocsAssets
from api.openapi.components import SECURITY_SCHEMES, schemas
from api.openapi.raw_routes import raw_paths

SCHEMA_PATH = "/schema"
_TAGS = [
    {"name": "gateway", "description": "OpenAI-compatible calls to the models' replicas, with a client key"},
]


def complete(document: dict[str, Any]) -> dict[str, Any]:
    """`document` (Litestar's) with the raw routes' paths, schemas and security schemes; a name both use is a bug."""
    done = copy.copy(document)
    raw = raw_paths()
    _add(done, "paths", raw)
    components = done["components"] = dict(done.get("components", {}))
    _add(components, "schemas", schemas())
    _add(components, "securitySchemes", SECURITY_SCHEMES)
    done["tags"] = [*document.get("tags", []), *_TAGS]
    return done


def _add(into: dict[str, Any], key: str, more: dict[str, Any]) -> None:
    have = into.get(key, {})
    both = set(have) & set(more)
    if both:
        raise ValueError(f"the raw routes' {key} and Litestar's share names: {sorted(both)}")
    into[key] = {**have, **more}


class _Completed:
    """The completed document of the one Litestar document the app serves, made at its first use."""

    def __init__(self) -> None:
        self._of: dict[str, Any] | None = None
        self._done: dict[str, Any] = {}

    def __call__(self, document: dict[str, Any]) -> dict[str, Any]:
        if document is not self._of:
            self._done, self._of = complete(document), document
        return self._done


class _Completing(OpenAPIRenderPlugin):
    """`inner`, rendering the completed document."""

    def __init__(self, inner: OpenAPIRenderPlugin, completed: _Completed) -> None:
        super().__init__(path=inner.paths, media_type=inner.media_type, favicon=inner.favicon, style=inner.style)
        self._inner = inner
        self._completed = completed

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        return self._inner.render(request, self._completed(openapi_schema))

    def receive_router(self, router: Router) -> None:
        self._inner.receive_router(router)


def openapi_config(title: str, version: str, assets: DocsAssets) -> OpenAPIConfig:
    """/schema (ReDoc), /schema/redoc, /schema/swagger, /schema/openapi.json and .yaml."""
    swagger = SwaggerRenderPlugin(
        js_url=assets.swagger_js,
        css_url=assets.swagger_css,
        standalone_preset_js_url=assets.swagger_preset_js,
        favicon=assets.favicon,
    )
    redoc = RedocRenderPlugin(js_url=assets.redoc_js, google_fonts=False, favicon=assets.favicon)
    completed = _Completed()
    plugins = [redoc, swagger, JsonRenderPlugin(), YamlRenderPlugin()]  # the first is also served at /schema
    return OpenAPIConfig(
        title=title,
        version=version,
        path=SCHEMA_PATH,
        render_plugins=[_Completing(plugin, completed) for plugin in plugins],
    )
