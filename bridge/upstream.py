"""Bitrix24 REST for one portal: rate limit, token refresh, error mapping, ``batch``.

Every error code of Bitrix24 ends in one of the classes of :mod:`bridge.errors`, so callers
decide on a type, never on a string.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
from aiolimiter import AsyncLimiter

from bridge import phpquery
from bridge.errors import (
    OutcomeUnknown,
    PortalStopped,
    StateError,
    TokenError,
    TransientError,
    UpstreamError,
)
from bridge.metrics import Metrics
from bridge.oauth import OAuthClient, portal_domain
from bridge.state import Portal

log = logging.getLogger(__name__)

RATE_LIMITED = "QUERY_LIMIT_EXCEEDED"
OPERATING_LIMITED = "OPERATION_TIME_LIMIT"
SERVER_FAULTS = frozenset({"INTERNAL_SERVER_ERROR", "ERROR_UNEXPECTED_ANSWER"})
TOKEN_CODES = frozenset({"expired_token", "invalid_token"})
STOPPING_CODES = frozenset(
    {
        "OVERLOAD_LIMIT",
        "WRONG_LICENSE",
        "ACCESS_DENIED",
        "WRONG_AUTH_TYPE",
        "insufficient_scope",
        "NO_AUTH_FOUND",
        "ERROR_METHOD_NOT_FOUND",
        "ERROR_ARGUMENT",
        "PORTAL_DELETED",
        "ERROR_BATCH_LENGTH_EXCEEDED",
        "ERROR_BATCH_METHOD_NOT_ALLOWED",
    }
)
MIN_OPERATING_WAIT = 10.0


def outcome_of(code: str | None) -> str:
    if code is None:
        return "ok"
    if code == RATE_LIMITED:
        return "rate_limited"
    if code == OPERATING_LIMITED:
        return "operating_limited"
    if code == "expired_token":
        return "expired_token"
    return "error"


@dataclass(frozen=True, slots=True)
class Answer:
    result: Any
    time: Mapping[str, Any] = field(default_factory=dict)
    total: int | None = None
    next: int | None = None


@dataclass(frozen=True, slots=True)
class BatchAnswer:
    results: Mapping[str, Any]
    errors: Mapping[str, UpstreamError]
    time: Mapping[str, Any]
    command_times: Mapping[str, Any] = field(default_factory=dict)


def error_for(
    code: str, description: str, method: str, time_block: Mapping[str, Any]
) -> UpstreamError:
    """Bitrix24's ``error`` code as one of our error classes."""
    if code == RATE_LIMITED or code in SERVER_FAULTS:
        return TransientError(code, description, method=method)
    if code == OPERATING_LIMITED:
        reset_at = time_block.get("operating_reset_at")
        wait = MIN_OPERATING_WAIT
        if isinstance(reset_at, int | float):
            wait = max(MIN_OPERATING_WAIT, float(reset_at) - time.time())
        return TransientError(code, description, method=method, retry_after=wait)
    if code in TOKEN_CODES:
        return TokenError(code, description, method=method)
    if code in STOPPING_CODES:
        return PortalStopped(code, description, method=method)
    return UpstreamError(code, description, method=method)


def backoff(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Exponential back-off with full jitter."""
    return random.uniform(0, min(cap, base * 2**attempt))


SaveTokens = Callable[[Portal], Awaitable[None]]


class PortalClient:
    """REST calls for one portal. The stored :class:`Portal` is replaced when tokens rotate."""

    def __init__(
        self,
        portal: Portal,
        *,
        http: httpx.AsyncClient,
        oauth: OAuthClient,
        save: SaveTokens,
        metrics: Metrics,
        rate_limit: float,
        rate_burst: int,
        max_rate_retries: int = 6,
        max_fault_retries: int = 3,
    ) -> None:
        self.portal = portal
        self._http = http
        self._oauth = oauth
        self._save = save
        self._metrics = metrics
        # Bitrix24's own bucket: +1 per request, drains `rate_limit` per second, refuses above
        # `rate_burst`. Mirroring it locally keeps us from ever hearing QUERY_LIMIT_EXCEEDED.
        self.limiter = AsyncLimiter(rate_burst, rate_burst / rate_limit)
        self._refresh_lock = asyncio.Lock()
        self._unsaved = False  # a refreshed token pair that could not be written yet
        self._max_rate_retries = max_rate_retries
        self._max_fault_retries = max_fault_retries
        self.requests = 0

    # -- public calls ------------------------------------------------------------------

    async def call(self, method: str, params: Mapping[str, Any], *, idempotent: bool) -> Answer:
        body = await self._request(method, dict(params), idempotent=idempotent)
        if "error" in body:
            code, desc = str(body["error"]), str(body.get("error_description", ""))
            self._count(method, code)
            raise error_for(code, desc, method, _dict(body.get("time")))
        self._count(method, None)
        return Answer(
            result=body.get("result"),
            time=_dict(body.get("time")),
            total=_int_or_none(body.get("total")),
            next=_int_or_none(body.get("next")),
        )

    async def batch(
        self, commands: Mapping[str, tuple[str, Mapping[str, Any]]], *, idempotent: bool
    ) -> BatchAnswer:
        """Run up to 50 commands in one request; per-command errors come back, not raised."""
        cmd = {
            key: f"{method}?{phpquery.encode(params)}" for key, (method, params) in commands.items()
        }
        body = await self._request("batch", {"halt": 0, "cmd": cmd}, idempotent=idempotent)
        if "error" in body:
            code, desc = str(body["error"]), str(body.get("error_description", ""))
            self._count("batch", code)
            raise error_for(code, desc, "batch", _dict(body.get("time")))
        self._count("batch", None)
        outer = _dict(body.get("result"))
        results = _dict(outer.get("result"))
        raw_errors = _dict(outer.get("result_error"))
        times = _dict(outer.get("result_time"))
        errors: dict[str, UpstreamError] = {}
        for key, (method, _params) in commands.items():
            raw = raw_errors.get(key)
            if raw is not None:
                info = _dict(raw)
                code = str(info.get("error", "ERROR_UNEXPECTED_ANSWER"))
                self._count(method, code)
                errors[key] = error_for(
                    code, str(info.get("error_description", "")), method, _dict(times.get(key))
                )
            elif key in results:
                self._count(method, None)
            else:
                # Neither a result nor an error: the answer is truncated, the outcome unknown.
                errors[key] = OutcomeUnknown("ERROR_UNEXPECTED_ANSWER", "no result", method=method)
        return BatchAnswer(
            results=results, errors=errors, time=_dict(body.get("time")), command_times=times
        )

    # -- transport -----------------------------------------------------------------------

    def _count(self, method: str, code: str | None) -> None:
        self._metrics.rest_calls.labels(method=method, outcome=outcome_of(code)).inc()

    async def _request(
        self, method: str, params: dict[str, Any], *, idempotent: bool
    ) -> dict[str, Any]:
        """One logical request: retries what is safe to retry, refreshes tokens once."""
        if self._unsaved:
            await self._save(self.portal)
            self._unsaved = False
        refreshed = False
        rate_attempts = 0
        fault_attempts = 0
        while True:
            token = self.portal.access_token
            try:
                body = await self._send(method, params, token, idempotent=idempotent)
            except OutcomeUnknown:
                if not idempotent or fault_attempts >= self._max_fault_retries:
                    raise
                fault_attempts += 1
                await asyncio.sleep(backoff(fault_attempts))
                continue
            code = body.get("error")
            if code == RATE_LIMITED and rate_attempts < self._max_rate_retries:
                # The request was refused before it ran: safe to repeat even if not idempotent.
                self._count(method, RATE_LIMITED)
                rate_attempts += 1
                await asyncio.sleep(backoff(rate_attempts, base=1.0))
                continue
            if code in TOKEN_CODES and not refreshed:
                self._count(method, str(code))
                await self._refresh(failed_token=token)
                refreshed = True
                continue
            if code in SERVER_FAULTS and idempotent and fault_attempts < self._max_fault_retries:
                self._count(method, str(code))
                fault_attempts += 1
                await asyncio.sleep(backoff(fault_attempts))
                continue
            return body

    async def _send(
        self, method: str, params: dict[str, Any], token: str, *, idempotent: bool
    ) -> dict[str, Any]:
        await self.limiter.acquire()
        self.requests += 1
        url = f"{self.portal.client_endpoint}{method}.json"
        try:
            response = await self._http.post(url, json={**params, "auth": token})
        except httpx.TimeoutException:
            raise OutcomeUnknown("TIMEOUT", "no answer in time", method=method) from None
        except httpx.HTTPError as exc:
            raise OutcomeUnknown("CONNECTION_ERROR", type(exc).__name__, method=method) from None
        if response.status_code in (301, 302, 307, 308) and "location" in response.headers:
            await self._follow_domain_change(response.headers["location"], method)
            return await self._send(method, params, self.portal.access_token, idempotent=idempotent)
        try:
            body = response.json()
        except ValueError:
            raise OutcomeUnknown(
                "ERROR_UNEXPECTED_ANSWER", f"HTTP {response.status_code}, not JSON", method=method
            ) from None
        if not isinstance(body, dict):
            raise OutcomeUnknown("ERROR_UNEXPECTED_ANSWER", "not a JSON object", method=method)
        return body

    async def _follow_domain_change(self, location: str, method: str) -> None:
        target = urlsplit(location)
        if target.scheme not in ("http", "https") or not target.netloc:
            raise PortalStopped(
                "BAD_REDIRECT", "the portal redirected to a malformed URL", method=method
            )
        endpoint = f"{target.scheme}://{target.netloc}/rest/"
        old = self.portal.domain
        self.portal = _replace_endpoint(self.portal, endpoint)
        await self._save(self.portal)
        log.warning(
            "portal domain changed", extra={"portal": old, "new_domain": self.portal.domain}
        )

    async def _refresh(self, *, failed_token: str) -> None:
        async with self._refresh_lock:
            if self.portal.access_token != failed_token:
                return  # someone else refreshed while we waited: use their token
            try:
                grant = await self._oauth.refresh(self.portal.refresh_token)
            except UpstreamError:
                self._metrics.token_refreshes.labels(outcome="failed").inc()
                raise
            if grant.member_id != self.portal.member_id:
                self._metrics.token_refreshes.labels(outcome="failed").inc()
                raise TokenError(
                    "member_mismatch", "the OAuth answer names another portal", method="oauth"
                )
            updated = self.portal.with_tokens(
                grant.access_token, grant.refresh_token, grant.expires_at
            )
            # Refresh tokens rotate: the old one is dead now, so the new pair must be on disk
            # before anything uses it.
            try:
                await self._save(updated)
            except StateError:
                # The old pair is dead already: keep the live one in memory, and save it before
                # any further call (see _request), rather than lose the portal.
                self.portal, self._unsaved = updated, True
                raise
            self.portal = updated
            self._metrics.token_refreshes.labels(outcome="ok").inc()
            log.info("access token refreshed", extra={"portal": self.portal.domain})


def _replace_endpoint(portal: Portal, endpoint: str) -> Portal:
    from dataclasses import replace

    return replace(portal, client_endpoint=endpoint, domain=portal_domain(endpoint))


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _int_or_none(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload, no-any-return]
    except (TypeError, ValueError, OverflowError):  # OverflowError: a JSON 1e999 is infinity
        return None
