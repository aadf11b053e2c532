"""The documentation pages of the real server load every file from the server itself (not from a CDN: offline, a
page that does is blank), each with its content type and a long cache lifetime."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from tests.support.server import serving

PAGES = ("/schema", "/schema/swagger", "/schema/redoc")
DAY_S = 24 * 3600


class _Loads(HTMLParser):
    """(what, URL) of every file a page loads: `<script src>` and `<link href>` (stylesheet, icon)."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "script" and found.get("src"):
            self.loads.append(("script", str(found["src"])))
        elif tag == "link" and found.get("href"):
            self.loads.append((str(found.get("rel")), str(found["href"])))


def loads_of(html: str) -> list[tuple[str, str]]:
    parser = _Loads()
    parser.feed(html)
    return parser.loads


EXPECTED_TYPE = {"script": "text/javascript", "stylesheet": "text/css", "icon": "image/png"}


def test_the_pages_load_every_file_from_this_server(tmp_path: Path) -> None:
    with serving(tmp_path / "state", "--no-scheduler") as (base, _), httpx.Client(base_url=base) as http:
        kinds = set()
        for page in PAGES:
            r = http.get(page)
            assert r.status_code == 200, (page, r.text[:300])
            assert r.headers["content-type"].startswith("text/html")
            loads = loads_of(r.text)
            assert any(what == "script" for what, _ in loads), page
            for what, url in loads:
                parts = urlsplit(url)
                assert (parts.scheme, parts.netloc) == ("", ""), (page, url)  # this server, whatever its address
                assert url.startswith("/schema/"), (page, url)
                asset = http.get(url)
                assert asset.status_code == 200, url
                assert asset.headers["content-type"].startswith(EXPECTED_TYPE[what]), (url, asset.headers)
                assert int(asset.headers["content-length"]) > 0
                cache = dict(part.strip().partition("=")[::2] for part in asset.headers["cache-control"].split(","))
                assert int(cache["max-age"]) >= DAY_S, cache
                kinds.add(what)
        assert kinds == set(EXPECTED_TYPE)


def test_the_files_directory_gives_nothing_else(tmp_path: Path) -> None:
    with serving(tmp_path / "state", "--no-scheduler") as (base, _), httpx.Client(base_url=base) as http:
        [script] = [url for what, url in loads_of(http.get("/schema/redoc").text) if what == "script"]
        under = script.rsplit("/redoc/", 1)[0]
        for path in ("/nothing.js", "/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/..%2f..%2f..%2fpyvenv.cfg"):
            r = http.get(under + path)
            assert r.status_code == 404, (path, r.status_code, r.text[:200])
