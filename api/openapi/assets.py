"""The files of the documentation pages (Swagger UI, ReDoc), served by this server from the package that ships them,
so that /schema/swagger and /schema/redoc work with no network beyond this server.

drf-spectacular-sidecar ships swagger-ui-dist and ReDoc's standalone bundle, each with its license. Its files are read
where it is installed and it is never imported (it is a Django app, and Django is not installed: pyproject.toml).
Their URLs carry the package's version, so a browser may keep them for a year: an upgrade changes every URL.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import distribution
from pathlib import Path

from litestar import Router
from litestar.datastructures import CacheControlHeader
from litestar.static_files import create_static_files_router

PACKAGE = "drf-spectacular-sidecar"
_ROOT = "drf_spectacular_sidecar/static/drf_spectacular_sidecar"
YEAR_S = 365 * 24 * 3600


@dataclass(frozen=True, slots=True)
class DocsAssets:
    """Where the pages' files are served, and the URL of each one the pages load."""

    base: str
    """The URL path the files are under, e.g. `/schema/static/2026.10.1`."""
    directory: Path

    @classmethod
    def installed(cls, under: str) -> DocsAssets:
        dist = distribution(PACKAGE)
        directory = Path(str(dist.locate_file(_ROOT)))
        if not (directory / "swagger-ui-dist" / "swagger-ui-bundle.js").is_file():
            raise RuntimeError(f"{PACKAGE} {dist.version} has no swagger-ui-dist under {directory}")
        return cls(f"{under.rstrip('/')}/{dist.version}", directory)

    def url(self, file: str) -> str:
        return f"{self.base}/{file}"

    @property
    def swagger_js(self) -> str:
        return self.url("swagger-ui-dist/swagger-ui-bundle.js")

    @property
    def swagger_preset_js(self) -> str:
        return self.url("swagger-ui-dist/swagger-ui-standalone-preset.js")

    @property
    def swagger_css(self) -> str:
        return self.url("swagger-ui-dist/swagger-ui.css")

    @property
    def redoc_js(self) -> str:
        return self.url("redoc/bundles/redoc.standalone.js")

    @property
    def favicon(self) -> str:
        """The `<link>` of the pages' icon (Litestar's default is an image on a CDN)."""
        return f"<link rel='icon' type='image/png' href='{self.url('swagger-ui-dist/favicon-32x32.png')}'>"

    def router(self) -> Router:
        """The files, with their content type (by extension) and a year's caching."""
        return create_static_files_router(
            self.base,
            directories=[self.directory],
            name="docs-assets",
            cache_control=CacheControlHeader(max_age=YEAR_S, public=True, immutable=True),
            include_in_schema=False,
        )
