"""Diadoc's HTTP API: the OpenID Connect refresh-token flow and ``GetDocflowEvents``.

Every failure ends in one class of :mod:`bridge.errors`: 429, 5xx and network trouble are
retried here with jittered back-off and end as :class:`TransientError`; 400/402/403/405 (a
configuration, subscription or permission problem no retry can fix) as :class:`PortalStopped`;
an OpenID provider that refuses the refresh token as :class:`TokenError`. Reading events is
side-effect free, so every retry repeats exactly the same request: the cursor never moves here.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from bridge.diadoc.metrics import DiadocMetrics
from bridge.errors import PortalStopped, TokenError, TransientError, UpstreamError
from bridge.state import State
from bridge.upstream import backoff

log = logging.getLogger(__name__)

METHOD = "GetDocflowEvents"
EVENTS_PATH = "/V4/GetDocflowEvents"
ERROR_HEADER = "X-Diadoc-ErrorCode"
STOPPING = frozenset({400, 402, 403, 405})
AUTH_SOURCE = "diadoc.auth"
REFRESH_KEY = "refresh_token"
BOOTSTRAP_KEY = "bootstrap_fingerprint"
EXPIRY_MARGIN = 30.0  # refresh this long before the access token would expire


@dataclass(frozen=True, slots=True)
class EventsPage:
    events: tuple[Any, ...]
    total_count: int | None


def _fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:32]


class DiadocAuth:
    """One access token for every box, refreshed single-flight; the refresh token rotates."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        token_url: str,
        client_id: str,
        client_secret: str,
        bootstrap_refresh_token: str | None,
        state: State,
        metrics: DiadocMetrics,
        timeout: float = 30.0,
    ) -> None:
        self._http = http
        self._url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self._bootstrap = bootstrap_refresh_token or None
        self._state = state
        self._metrics = metrics
        self._timeout = timeout
        self._lock = asyncio.Lock()
        self._access: str | None = None
        self._expires_at = 0.0
        self._renewal: asyncio.Task[str] | None = None
        self.refreshes = 0

    async def token(self) -> str:
        access = self._access
        if access is not None and time.time() < self._expires_at - EXPIRY_MARGIN:
            return access
        return await self.refresh(failed_token=access)

    async def refresh(self, *, failed_token: str | None) -> str:
        """A new access token, unless another caller already replaced ``failed_token``."""
        async with self._lock:
            renewal = self._renewal
            if renewal is not None and not renewal.done():
                # Its caller was cancelled mid-way; the renewal itself was not (see below).
                await asyncio.shield(renewal)
            if self._access is not None and self._access != failed_token:
                return self._access
            # Shielded: once the provider rotated the refresh token, the new one must reach the
            # state file even if the pass that asked is cancelled (a shutdown, say); losing it
            # would kill the token chain for good.
            renewal = self._renewal = asyncio.create_task(self._renew(), name="diadoc oidc")
            renewal.add_done_callback(_retrieve)
            return await asyncio.shield(renewal)

    async def settle(self) -> None:
        """Wait for a renewal still running for a cancelled caller (before closing the state)."""
        if self._renewal is not None:
            await asyncio.gather(self._renewal, return_exceptions=True)

    async def _renew(self) -> str:
        refresh_token, from_bootstrap = await self._refresh_token()
        try:
            access, expires_in, rotated = await self._exchange(refresh_token)
        except UpstreamError:
            self._metrics.token_refreshes.labels(outcome="failed").inc()
            raise
        # Refresh tokens may rotate: the old one may be dead already, so the new one is on
        # disk before the access token that came with it is used.
        if rotated is not None and rotated != refresh_token:
            await self._state.set_source_secret(AUTH_SOURCE, REFRESH_KEY, rotated)
        elif from_bootstrap:
            await self._state.set_source_secret(AUTH_SOURCE, REFRESH_KEY, refresh_token)
        if from_bootstrap and self._bootstrap is not None:
            await self._state.set_cursor(AUTH_SOURCE, BOOTSTRAP_KEY, _fingerprint(self._bootstrap))
        self._access = access
        self._expires_at = time.time() + expires_in
        self.refreshes += 1
        self._metrics.token_refreshes.labels(outcome="ok").inc()
        log.info("diadoc access token refreshed", extra={"expires_in_s": round(expires_in)})
        return access

    async def _refresh_token(self) -> tuple[str, bool]:
        """The refresh token to use, and whether it is the bootstrap variable's.

        The stored token wins over ``BRIDGE_DIADOC_REFRESH_TOKEN`` (which is dead after its first
        rotation), unless the variable now holds a token never used before: an operator who
        issues a new one after the old chain broke should not have to edit the state file.
        """
        stored = await self._state.source_secret(AUTH_SOURCE, REFRESH_KEY)
        if self._bootstrap is not None:
            used = await self._state.cursor(AUTH_SOURCE, BOOTSTRAP_KEY)
            if stored is None or used != _fingerprint(self._bootstrap):
                return self._bootstrap, True
        if stored is None:
            raise TokenError("no_refresh_token", "set BRIDGE_DIADOC_REFRESH_TOKEN", method="oidc")
        return stored, False

    async def _exchange(self, refresh_token: str) -> tuple[str, float, str | None]:
        form = {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": self._client_id,
            "client_secret": self._client_secret,
        }
        try:
            response = await self._http.post(self._url, data=form, timeout=self._timeout)
        except httpx.HTTPError as exc:
            # Never format the request: its body carries the secret and the token.
            raise TransientError("oidc_unreachable", type(exc).__name__, method="oidc") from None
        try:
            body: Any = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise TransientError(
                "oidc_bad_answer", f"HTTP {response.status_code}, not a JSON object", method="oidc"
            )
        error = body.get("error")
        if error or response.status_code != 200:
            code = str(error or f"HTTP {response.status_code}")
            if response.status_code >= 500 or response.status_code == 429:
                raise TransientError(code, method="oidc")
            raise TokenError(code, "the OpenID provider refused the refresh token", method="oidc")
        access = body.get("access_token")
        rotated = body.get("refresh_token")
        try:
            expires_in = float(body.get("expires_in", 3600))
        except (TypeError, ValueError):
            expires_in = 3600.0
        if not isinstance(access, str) or not access:
            raise TransientError("oidc_bad_answer", "no access_token", method="oidc")
        return access, expires_in, rotated if isinstance(rotated, str) and rotated else None


class DiadocClient:
    def __init__(
        self,
        http: httpx.AsyncClient,
        auth: DiadocAuth,
        *,
        api_url: str,
        metrics: DiadocMetrics,
        timeout: float = 30.0,
        max_attempts: int = 5,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
    ) -> None:
        self._http = http
        self.auth = auth
        self._url = api_url.rstrip("/") + EVENTS_PATH
        self._metrics = metrics
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
            if outcome == "stop":
                assert response is not None
                raise PortalStopped(
                    f"HTTP {response.status_code}", _detail(response, ""), method=METHOD
                )
            if outcome == "error":
                assert response is not None
                raise UpstreamError(
                    f"HTTP {response.status_code}", _detail(response, ""), method=METHOD
                )
            attempts += 1
            code = "network" if response is None else f"HTTP {response.status_code}"
            if attempts >= self._max_attempts:
                raise TransientError(code, _detail(response, "retries exhausted"), method=METHOD)
            delay = backoff(attempts, base=self._backoff_base, cap=self._backoff_cap)
            retry_after = _retry_after(response)
            if retry_after is not None:
                delay = max(delay, min(retry_after, self._backoff_cap))
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
                    "Accept": "application/json",
                    "Content-Type": "application/json; charset=utf-8",
                },
                timeout=self._timeout,
            )
        except httpx.HTTPError:
            self._metrics.requests.labels(outcome="network").inc()
            return "transient", None
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
        try:
            body: Any = response.json()
        except ValueError:
            raise TransientError("bad_answer", "not JSON", method=METHOD) from None
        events = body.get("Events") if isinstance(body, dict) else None
        if events is None and isinstance(body, dict):
            events = []  # protobuf-JSON omits empty repeated fields
        if not isinstance(events, list):
            raise TransientError("bad_answer", "no Events list", method=METHOD)
        total = body.get("TotalCount")
        return EventsPage(tuple(events), total if isinstance(total, int) else None)


def _retrieve(task: asyncio.Task[str]) -> None:
    # A renewal whose caller was cancelled may fail unobserved; its error was counted already.
    if not task.cancelled():
        task.exception()


def _detail(response: httpx.Response | None, fallback: str) -> str:
    """What Diadoc said went wrong: its error code header, never the request."""
    if response is None:
        return fallback
    code = response.headers.get(ERROR_HEADER)
    return f"{ERROR_HEADER}: {code}" if code else fallback


def _retry_after(response: httpx.Response | None) -> float | None:
    if response is None:
        return None
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return None
