"""Notifications the portal POSTs to the application, form-encoded with PHP-style keys.

Delivery is fire-and-forget, as on a real portal: one attempt, no retry, never resent.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Mapping
from typing import Any

import httpx

from bridge.emulators.bitrix24.phpform import http_build_query

log = logging.getLogger(__name__)

FORM = "application/x-www-form-urlencoded"


class Notifier:
    def __init__(self, timeout: float = 10.0) -> None:
        self._timeout = timeout
        self._client: httpx.AsyncClient | None = None
        self._pending: set[asyncio.Task[int | None]] = set()
        self.stats: Counter[str] = Counter()

    def _http(self) -> httpx.AsyncClient:
        # Created lazily inside the emulator's loop: the client must belong to that loop.
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout, follow_redirects=False)
        return self._client

    async def post(self, url: str, form: Mapping[str, Any]) -> int | None:
        """Deliver once; the handler's HTTP status, or None if it could not be reached."""
        event = str(form.get("event", "?"))
        try:
            response = await self._http().post(
                url, content=http_build_query(form).encode(), headers={"Content-Type": FORM}
            )
        except httpx.HTTPError as exc:
            self.stats["failed"] += 1
            log.warning("notification %s to %s failed: %s", event, url, type(exc).__name__)
            return None
        ok = 200 <= response.status_code < 300
        self.stats["delivered" if ok else "failed"] += 1
        log.info("notification %s to %s answered %d", event, url, response.status_code)
        return response.status_code

    def fire(self, url: str, form: Mapping[str, Any]) -> None:
        """Send in the background; the request that caused it does not wait."""
        self.stats["sent"] += 1
        task = asyncio.get_running_loop().create_task(self.post(url, form))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def send(self, url: str, form: Mapping[str, Any]) -> int | None:
        self.stats["sent"] += 1
        return await self.post(url, form)

    async def aclose(self, grace: float = 1.0) -> None:
        if self._pending:
            await asyncio.wait(self._pending, timeout=grace)
        for task in list(self._pending):
            task.cancel()
        if self._client is not None:
            await self._client.aclose()
            self._client = None
