"""Bitrix24 REST for one portal: rate limit, token refresh, error mapping, ``batch``.

Every error code of Bitrix24 ends in one of the classes of :mod:`bridge.core.errors`, so callers
decide on a type, never on a string.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import httpx
from aiolimiter import AsyncLimiter

from bridge.bitrix24 import phpquery
from bridge.bitrix24.oauth import OAuthClient, portal_domain
from bridge.bitrix24.pacing import BAN_PROBE_INTERVAL, Pacer
from bridge.core.errors import (
    OutcomeUnknown,
    PortalStopped,
    StateError,
    TokenError,
    TransientError,
    UpstreamError,
)
from bridge.core.retry import backoff
from bridge.metrics import Metrics
from bridge.state import Portal

log = logging.getLogger(__name__)

RATE_LIMITED = "QUERY_LIMIT_EXCEEDED"
OPERATING_LIMITED = "OPERATION_TIME_LIMIT"
SERVER_FAULTS = frozenset({"INTERNAL_SERVER_ERROR", "ERROR_UNEXPECTED_ANSWER"})
# The portal could not check the token with the OAuth server: its trouble, not ours.
AUTH_LAYER_FAULTS = frozenset({"ERROR_OAUTH", "CONNECTION_ERROR"})
TOKEN_CODES = frozenset({"expired_token", "invalid_token"})
HOUR = 3600.0
# Codes that stop a portal's drain, and how long until it is tried again (None: never, until
# a restart or a new install). Retrying sooner would not help and Bitrix24 asks apps not to.
STOPPING_CODES: dict[str, float | None] = {
    # An administrator blocked the application: do not retry.
    "OVERLOAD_LIMIT": None,
    # Configuration or programming errors.
    "WRONG_LICENSE": HOUR,
    "ACCESS_DENIED": HOUR,
    "WRONG_AUTH_TYPE": HOUR,
    "insufficient_scope": HOUR,
    "NO_AUTH_FOUND": HOUR,
    "ERROR_METHOD_NOT_FOUND": HOUR,
    "ERROR_ARGUMENT": HOUR,
    "PORTAL_DELETED": HOUR,
    "ERROR_BATCH_LENGTH_EXCEEDED": HOUR,
    "ERROR_BATCH_METHOD_NOT_ALLOWED": HOUR,
    # Not installed (an uninstall notification may have been lost), subscription expired,
    # the administrator holding the token lost access or rights, a method refused.
    "APPLICATION_NOT_FOUND": HOUR,
    "PAYMENT_REQUIRED": HOUR,
    "authorization_error": HOUR,
    "user_access_error": HOUR,
    "INVALID_CREDENTIALS": HOUR,
    "METHOD_CONFIRM_DENIED": HOUR,
    # An administrator has to approve the method for this application: look again soon.
    "METHOD_CONFIRM_WAITING": 300.0,
}


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


def error_for(code: str, description: str, method: str) -> UpstreamError:
    """Bitrix24's ``error`` code as one of our error classes (never the HTTP status: it
    differs between portal versions)."""
    if code == RATE_LIMITED or code in SERVER_FAULTS or code in AUTH_LAYER_FAULTS:
        return TransientError(code, description, method=method)
    if code == OPERATING_LIMITED:
        # The method is banned for a fixed time the answer does not tell (errors carry no
        # `time` block): probe once a minute.
        return TransientError(code, description, method=method, retry_after=BAN_PROBE_INTERVAL)
    if code in TOKEN_CODES:
        return TokenError(code, description, method=method)
    if code in STOPPING_CODES:
        return PortalStopped(code, description, method=method, recheck_after=STOPPING_CODES[code])
    return UpstreamError(code, description, method=method)


SaveTokens = Callable[[Portal], Awaitable[None]]
LoadPortal = Callable[[str], Awaitable[Portal | None]]
Exchange = Callable[[Portal], Awaitable[Portal]]
# (member_id, failed access token, exchange) -> (the portal's tokens now, whether we exchanged):
# a refresh several replicas share, run under the stored row's lock (PgState.refresh_portal).
SharedRefresh = Callable[[str, str, Exchange], Awaitable[tuple[Portal, bool]]]


class PortalClient:
    """REST calls for one portal. The stored :class:`Portal` is replaced when tokens rotate.

    The client also owns the portal's operating-time :class:`Pacer`: every successful answer
    tells it the running totals, every ``OPERATION_TIME_LIMIT`` bans the method in it.
    """

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
        load: LoadPortal | None = None,
        pacer: Pacer | None = None,
        refresh: bool = True,
        max_rate_retries: int = 6,
        max_fault_retries: int = 3,
        guard: Callable[[], None] | None = None,
        headers: Mapping[str, str] | None = None,
        shared_refresh: SharedRefresh | None = None,
        bucket_full: bool = False,
    ) -> None:
        self.portal = portal
        # Scaled mode: ``guard`` raises LeaseLost once this replica may no longer act for the
        # portal (checked before every request, OAuth included); ``headers`` name the replica
        # and its shard epoch on every request.
        self._guard = guard
        self._headers = dict(headers or {})
        self._shared_refresh = shared_refresh
        self._http = http
        self._oauth = oauth
        self._save = save
        self._load = load
        self._metrics = metrics
        self.pacer = pacer or Pacer()
        # Bitrix24's own bucket: +1 per request, drains `rate_limit` per second, refuses above
        # `rate_burst`. Mirroring it locally keeps us from ever hearing QUERY_LIMIT_EXCEEDED.
        self.limiter = AsyncLimiter(rate_burst, rate_burst / rate_limit)
        # Scaled mode, a portal taken over: the previous owner may have left the portal's
        # bucket full a moment ago, so start as if it were (the sustained rate from the start,
        # no burst until the bucket has drained).
        self._bucket_full = bucket_full
        self._may_refresh = refresh
        self._refresh_lock = asyncio.Lock()
        self._refreshing: asyncio.Task[bool] | None = None
        self._unsaved = False  # a refreshed token pair that could not be written yet
        self._max_rate_retries = max_rate_retries
        self._max_fault_retries = max_fault_retries
        self.requests = 0
        self.last_answer = time.monotonic()  # when the portal last answered anything

    async def aclose(self) -> None:
        """Let a refresh in flight finish and save its token: the old one is dead already."""
        task = self._refreshing
        if task is not None and not task.done():
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(task)

    # -- public calls ------------------------------------------------------------------

    async def call(self, method: str, params: Mapping[str, Any], *, idempotent: bool) -> Answer:
        self.pacer.budget(method).spend(1)
        body = await self._request(method, dict(params), idempotent=idempotent)
        if "error" in body:
            code, desc = str(body["error"]), str(body.get("error_description", ""))
            self._count(method, code)
            if code == OPERATING_LIMITED:
                self._banned(method)
            raise error_for(code, desc, method)
        self._count(method, None)
        time_block = _dict(body.get("time"))
        self.pacer.observe_call(method, time_block)
        return Answer(
            result=body.get("result"),
            time=time_block,
            total=_int_or_none(body.get("total")),
            next=_int_or_none(body.get("next")),
        )

    async def batch(
        self,
        commands: Mapping[str, tuple[str, Mapping[str, Any]]],
        *,
        idempotent: bool,
        connector: str = "",
    ) -> BatchAnswer:
        """Run up to 50 commands in one request; per-command errors come back, not raised.

        ``connector`` is the ``auth_connector`` of every command: Bitrix24 reads it from the
        request itself only (next to ``auth``) and ignores one inside a command. A command
        refused for an expired token is sent again once, after a refresh.
        """
        token = self.portal.access_token
        answer = await self._batch_once(commands, idempotent=idempotent, connector=connector)
        stale = {k: commands[k] for k, e in answer.errors.items() if e.code in TOKEN_CODES}
        if not stale:
            return answer
        # Refused before running: safe to send again, whatever the method.
        await self._refresh(failed_token=token)
        retry = await self._batch_once(stale, idempotent=idempotent, connector=connector)
        results = {**answer.results, **retry.results}
        errors = {k: e for k, e in answer.errors.items() if k not in stale}
        errors.update(retry.errors)
        times = {**answer.command_times, **retry.command_times}
        return BatchAnswer(results=results, errors=errors, time=retry.time, command_times=times)

    async def _batch_once(
        self,
        commands: Mapping[str, tuple[str, Mapping[str, Any]]],
        *,
        idempotent: bool,
        connector: str,
    ) -> BatchAnswer:
        cmd = {
            key: f"{method}?{phpquery.encode(params)}" for key, (method, params) in commands.items()
        }
        params: dict[str, Any] = {"halt": 0, "cmd": cmd}
        if connector:
            params["auth_connector"] = connector
        calls: dict[str, int] = {}
        for method, _params in commands.values():
            calls[method] = calls.get(method, 0) + 1
        for method, count in calls.items():
            self.pacer.budget(method).spend(count)
        self.pacer.budget("batch").spend(1)
        body = await self._request("batch", params, idempotent=idempotent)
        if "error" in body:
            code, desc = str(body["error"]), str(body.get("error_description", ""))
            self._count("batch", code)
            if code == OPERATING_LIMITED:
                self._banned("batch")
            raise error_for(code, desc, "batch")
        self._count("batch", None)
        outer = _dict(body.get("result"))
        results = _dict(outer.get("result"))
        raw_errors = _dict(outer.get("result_error"))
        times = _dict(outer.get("result_time"))
        errors: dict[str, UpstreamError] = {}
        banned: set[str] = set()
        for key, (method, _params) in commands.items():
            raw = raw_errors.get(key)
            if raw is not None:
                info = _dict(raw)
                code = str(info.get("error", "ERROR_UNEXPECTED_ANSWER"))
                self._count(method, code)
                if code == OPERATING_LIMITED:
                    banned.add(method)
                errors[key] = error_for(code, str(info.get("error_description", "")), method)
            elif key in results:
                self._count(method, None)
            else:
                # Neither a result nor an error: the answer is truncated, the outcome unknown.
                errors[key] = OutcomeUnknown("ERROR_UNEXPECTED_ANSWER", "no result", method=method)
        time_block = _dict(body.get("time"))
        self.pacer.observe({k: m for k, (m, _p) in commands.items()}, times, time_block)
        for method in banned:
            self._banned(method)
        return BatchAnswer(results=results, errors=errors, time=time_block, command_times=times)

    # -- transport -----------------------------------------------------------------------

    def _banned(self, method: str) -> None:
        self.pacer.banned(method)
        self._metrics.operating_bans.labels(method=method).inc()
        log.warning(
            "operating-time limit reached: the method is banned for a while; probing once a minute",
            extra={"portal": self.portal.domain, "method": method},
        )

    def _count(self, method: str, code: str | None) -> None:
        self._metrics.rest_calls.labels(method=method, outcome=outcome_of(code)).inc()

    async def _request(
        self, method: str, params: dict[str, Any], *, idempotent: bool
    ) -> dict[str, Any]:
        """One logical request: retries what is safe to retry, refreshes tokens once."""
        if self._unsaved:
            await self._save(self.portal)
            self._unsaved = False
        refreshes = 0
        rate_attempts = 0
        fault_attempts = 0
        while True:
            try:
                body, token = await self._send(method, params, idempotent=idempotent)
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
            if code in TOKEN_CODES and refreshes < 1 and self._may_refresh:
                self._count(method, str(code))
                if not await self._refresh(failed_token=token):
                    refreshes += 1  # an adopted token may need a refresh of its own
                continue
            if code in SERVER_FAULTS and idempotent and fault_attempts < self._max_fault_retries:
                self._count(method, str(code))
                fault_attempts += 1
                await asyncio.sleep(backoff(fault_attempts))
                continue
            return body

    async def _send(
        self, method: str, params: dict[str, Any], *, idempotent: bool
    ) -> tuple[dict[str, Any], str]:
        """The answer, and the access token it was sent with."""
        if self._bucket_full:
            self._bucket_full = False
            await self.limiter.acquire(self.limiter.max_rate)
        await self.limiter.acquire()
        if self._guard is not None:
            self._guard()
        # Read only now: a refresh may have finished while this request waited for its turn.
        token = self.portal.access_token
        self.requests += 1
        url = f"{self.portal.client_endpoint}{method}.json"
        try:
            response = await self._http.post(
                url, json={**params, "auth": token}, headers=self._headers or None
            )
        except httpx.TimeoutException:
            raise OutcomeUnknown("TIMEOUT", "no answer in time", method=method) from None
        except httpx.HTTPError as exc:
            raise OutcomeUnknown("CONNECTION_ERROR", type(exc).__name__, method=method) from None
        self.last_answer = time.monotonic()
        if response.status_code in (301, 302, 307, 308) and "location" in response.headers:
            await self._follow_domain_change(response.headers["location"], method)
            return await self._send(method, params, idempotent=idempotent)
        try:
            body = response.json()
        except ValueError:
            raise OutcomeUnknown(
                "ERROR_UNEXPECTED_ANSWER", f"HTTP {response.status_code}, not JSON", method=method
            ) from None
        if not isinstance(body, dict):
            raise OutcomeUnknown("ERROR_UNEXPECTED_ANSWER", "not a JSON object", method=method)
        return body, token

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

    # -- tokens --------------------------------------------------------------------------

    async def _refresh(self, *, failed_token: str) -> bool:
        """Single-flight refresh; the exchange and the save run shielded from cancellation.

        Refresh tokens rotate: once the OAuth server answered, the old pair is dead, so the new
        one must reach the state file even if the caller is cancelled (a shutdown, say).
        """
        if not self._may_refresh:
            raise TokenError("expired_token", "this command does not refresh tokens")
        async with self._refresh_lock:
            if self.portal.access_token != failed_token:
                return False  # someone else refreshed while we waited: use their token
            task = asyncio.ensure_future(self._exchange())
            self._refreshing = task
            return await asyncio.shield(task)

    async def _exchange(self) -> bool:
        """Answers True when a token rotated elsewhere was adopted instead."""
        if self._shared_refresh is not None:
            return await self._exchange_shared(self._shared_refresh)
        if self._guard is not None:
            self._guard()
        try:
            grant = await self._oauth.refresh(self.portal.refresh_token)
        except TokenError:
            if await self._adopt_stored():
                return True
            self._metrics.token_refreshes.labels(outcome="failed").inc()
            raise
        except UpstreamError:
            self._metrics.token_refreshes.labels(outcome="failed").inc()
            raise
        if grant.member_id != self.portal.member_id:
            self._metrics.token_refreshes.labels(outcome="failed").inc()
            raise TokenError(
                "member_mismatch", "the OAuth answer names another portal", method="oauth"
            )
        updated = self.portal.with_tokens(grant.access_token, grant.refresh_token, grant.expires_at)
        # The old pair is dead now: the new one must be on disk before anything uses it.
        try:
            await self._save(updated)
        except StateError:
            # Keep the live pair in memory and save it before any further call (see _request),
            # rather than lose the portal.
            self.portal, self._unsaved = updated, True
            raise
        self.portal = updated
        self._metrics.token_refreshes.labels(outcome="ok").inc()
        log.info("access token refreshed", extra={"portal": self.portal.domain})
        return False

    async def _exchange_shared(self, shared: SharedRefresh) -> bool:
        """The refresh of several replicas: under the stored row's lock, presenting the stored
        refresh token only if nobody refreshed since ``self.portal``'s access token failed."""
        exchanged: list[Portal] = []

        async def exchange(stored: Portal) -> Portal:
            if self._guard is not None:
                self._guard()
            grant = await self._oauth.refresh(stored.refresh_token, headers=self._headers or None)
            if grant.member_id != stored.member_id:
                raise TokenError(
                    "member_mismatch", "the OAuth answer names another portal", method="oauth"
                )
            fresh = stored.with_tokens(grant.access_token, grant.refresh_token, grant.expires_at)
            exchanged.append(fresh)
            return fresh

        try:
            portal, did_exchange = await shared(
                self.portal.member_id, self.portal.access_token, exchange
            )
        except StateError:
            if exchanged:  # the old pair is dead: keep the new one and save it before any use
                self.portal, self._unsaved = replace(self.portal, **_tokens_of(exchanged[0])), True
            raise
        except UpstreamError:
            self._metrics.token_refreshes.labels(outcome="failed").inc()
            raise
        self.portal = replace(self.portal, **_tokens_of(portal))
        outcome = "ok" if did_exchange else "adopted"
        self._metrics.token_refreshes.labels(outcome=outcome).inc()
        log.info("access token refreshed", extra={"portal": self.portal.domain, "by": outcome})
        return not did_exchange

    async def _adopt_stored(self) -> bool:
        """The OAuth server refused our refresh token: has another process rotated it?"""
        if self._load is None:
            return False
        try:
            stored = await self._load(self.portal.member_id)
        except StateError:
            return False
        if stored is None or not stored.refresh_token:
            return False
        if stored.refresh_token == self.portal.refresh_token:
            return False
        self.portal = replace(self.portal, **_tokens_of(stored))
        self._metrics.token_refreshes.labels(outcome="adopted").inc()
        log.warning(
            "refresh token was rotated elsewhere: using the stored one",
            extra={"portal": self.portal.domain},
        )
        return True


def _tokens_of(portal: Portal) -> dict[str, Any]:
    return {
        "access_token": portal.access_token,
        "refresh_token": portal.refresh_token,
        "expires_at": portal.expires_at,
    }


def _replace_endpoint(portal: Portal, endpoint: str) -> Portal:
    return replace(portal, client_endpoint=endpoint, domain=portal_domain(endpoint))


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _int_or_none(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload, no-any-return]
    except (TypeError, ValueError, OverflowError):  # OverflowError: a JSON 1e999 is infinity
        return None
