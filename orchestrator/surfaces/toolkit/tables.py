"""The toolkit's `/tables`: every table's name, and a table's newest rows with its secret columns redacted."""

from __future__ import annotations

from typing import Any

from orchestrator.store.browse import TableBrowser


class TableService:
    def __init__(self, browser: TableBrowser) -> None:
        self._browser = browser

    def names(self) -> list[str]:
        return self._browser.names()

    async def rows(self, name: str) -> list[dict[str, Any]]:
        """The table's newest rows (at most `store.browse.BROWSE_LIMIT`), or NotFound for a name that is no table."""
        return await self._browser.rows(name)
