"""Diadoc's ``GetDocflowEvents`` over HTTP, JSON in and out (``Accept: application/json``).

Every failure ends in one class of :mod:`bridge.core.errors`: 429, 5xx and network trouble are
retried here with jittered back-off and end as :class:`TransientError` (carrying the server's
``Retry-After`` when it asks for longer than this client waits, so the box's back-off honours
it); 400/402/403/404/405/415 (a configuration, subscription, permission or version problem no
retry can fix) end as :class:`PortalStopped` with the reason; a refused refresh token as
:class:`TokenError`. Reading events is side-effect free, so every retry repeats exactly the same
request: the cursor never moves here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from bridge.core.errors import PortalStopped, TokenError, TransientError, UpstreamError
from bridge.core.retry import backoff
from bridge.diadoc.auth import DiadocAuth
from bridge.diadoc.headers import ApiNotices, retry_after
from bridge.diadoc.metrics import DiadocMetrics

log = logging.getLogger(__name__)

METHOD = "GetDocflowEvents"
ERROR_HEADER = "X-Diadoc-ErrorCode"
STOPPING = frozenset({400, 402, 403, 404, 405, 415})
MAX_RETRY_AFTER = 3600.0  # a longer Retry-After is taken as an hour
_HINTS = {
    402: "the organisation's Diadoc API subscription has ended",
    404: "this API version or URL does not serve GetDocflowEvents: check "
    "BRIDGE_DIADOC_API_VERSION and BRIDGE_DIADOC_API_URL",
    415: "Diadoc refused the request's content type",
}


@dataclass(frozen=True, slots=True)
class EventsPage:
    events: tuple[Any, ...]
    total_count: int | None


class DiadocClient:
    def __init__(
        self,
        http: httpx.AsyncClient,
        auth: DiadocAuth,
        *,
        api_url: str,
        metrics: DiadocMetrics,
        api_version: str = "V5",
        timeout: float = 30.0,
        max_attempts: int = 5,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
    ) -> None:
        self._http = http
        self.auth = auth
        self.api_version = api_version
        self._url = f"{api_url.rstrip('/')}/{api_version}/{METHOD}"
        self._metrics = metrics
        self._notices = ApiNotices(metrics, api_version)
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self.requests = 0

    async def docflow_events(self, box_id: str, request: Mapping[str, Any]) -> EventsPage:
        """One page of events; the same request is repeated until it is answered or fails."""
        attempts = 0
        refreshed = 0
        while True:
            token = await self.auth.token()
            outcome, response = await self._send(box_id, request, token)
            if outcome == "ok":
                assert response is not None
                return self._page(response)
            if outcome == "unauthorized":
                # The token expired or was revoked: new token, same page. Twice in a row with a
                # fresh token means the credentials lack access, not an expiry.
                if refreshed >= 2:
                    raise TokenError(
                        "unauthorized", _detail(response, "401 with a fresh token"), method=METHOD
                    )
                refreshed += 1
                await self.auth.refresh(failed_token=token)
                continue
            if outcome in ("stop", "error"):
                assert response is not None
                status = response.status_code
                error = PortalStopped if outcome == "stop" else UpstreamError
                raise error(
                    f"HTTP {status}", _detail(response, _hint(status, request)), method=METHOD
                )
            attempts += 1
            code = "network" if response is None else f"HTTP {response.status_code}"
            wait = retry_after(response)
            if wait is not None and wait > self._backoff_cap:
                # Longer than this client waits between attempts: end the pass and let the
                # box's back-off wait, instead of asking again before the server is ready.
                wait = min(wait, MAX_RETRY_AFTER)
                raise TransientError(
                    code, f"Retry-After {wait:g} s", method=METHOD, retry_after=wait
                )
            if attempts >= self._max_attempts:
                raise TransientError(
                    code, _detail(response, "retries exhausted"), method=METHOD, retry_after=wait
                )
            delay = max(
                backoff(attempts, base=self._backoff_base, cap=self._backoff_cap), wait or 0
            )
            log.info(
                "diadoc request will be retried",
                extra={"box": box_id, "reason": code, "delay_s": round(delay, 2)},
            )
            await asyncio.sleep(delay)

    async def _send(
        self, box_id: str, request: Mapping[str, Any], token: str
    ) -> tuple[str, httpx.Response | None]:
        self.requests += 1
        try:
            response = await self._http.post(
                self._url,
                params={"boxId": box_id},
                json=dict(request),
                headers={
                    "Authorization": f"Bearer {token}",
                    # Without it Diadoc answers protobuf.
                    "Accept": "application/json",
                    "Content-Type": "application/json; charset=utf-8",
                },
                timeout=self._timeout,
            )
        except httpx.HTTPError:
            self._metrics.requests.labels(outcome="network").inc()
            return "transient", None
        self._notices.check(response)
        status = response.status_code
        if status == 200:
            outcome = "ok"
        elif status == 401:
            outcome = "unauthorized"
        elif status == 429 or status >= 500:
            outcome = "transient"
        elif status in STOPPING:
            outcome = "stop"
        else:
            outcome = "error"
        self._metrics.requests.labels(outcome=outcome).inc()
        return outcome, response

    def _page(self, response: httpx.Response) -> EventsPage:
        media = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if "protobuf" in media:
            raise PortalStopped(
                "protobuf_answer",
                "Diadoc answered protobuf: the request lacked Accept: application/json",
                method=METHOD,
            )
        try:
            body: Any = response.json()
        except ValueError:
            raise TransientError(
                "bad_answer", f"not JSON ({media or 'no type'})", method=METHOD
            ) from None
        events = body.get("Events") if isinstance(body, dict) else None
        if events is None and isinstance(body, dict):
            events = []  # protobuf-JSON omits empty repeated fields
        if not isinstance(events, list):
            raise TransientError("bad_answer", "no Events list", method=METHOD)
        total = body.get("TotalCount")
        return EventsPage(tuple(events), total if isinstance(total, int) else None)


def _hint(status: int, request: Mapping[str, Any]) -> str:
    if status == 403 and "DepartmentId" not in request:
        return (
            "no access to the box, or the account sees only some departments of it: "
            "set BRIDGE_DIADOC_DEPARTMENT_ID"
        )
    return _HINTS.get(status, "")


def _detail(response: httpx.Response | None, fallback: str) -> str:
    """What Diadoc said went wrong (its error code header, never the request), and why."""
    if response is None:
        return fallback
    code = response.headers.get(ERROR_HEADER)
    said = f"{ERROR_HEADER}: {code}" if code else ""
    return "; ".join(part for part in (said, fallback) if part)
