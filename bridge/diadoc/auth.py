"""Diadoc's OpenID Connect refresh-token flow: one access token for every box.

Refresh tokens rotate: once the provider answered, the token on disk is dead and only the new one
works. So the new one is written to the state file before the access token that came with it is
used, in one transaction with the fingerprint of the bootstrap variable it may replace (a kill
between two separate writes would make the next start present the dead bootstrap token). The
renewal runs as its own shielded task, so a cancelled caller (a shutdown) cannot stop it between
the provider's answer and the write; :meth:`DiadocAuth.settle` waits for it. When the write fails,
the rotated token stays in memory and is written before the next use.

Several replicas (scaled mode) share the session: they pass ``exclusive``, a lock held across the
database (an advisory lock), and renew only under it. Under the lock a replica first looks at the
access token stored with the refresh token: one that another replica got since this one's token
failed is adopted; otherwise the refresh token read under the lock is presented, so no refresh
token is ever presented twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import httpx

from bridge.core.errors import StateError, TokenError, TransientError, UpstreamError
from bridge.diadoc.metrics import DiadocMetrics
from bridge.state.open import StateStore

log = logging.getLogger(__name__)

AUTH_SOURCE = "diadoc.auth"
REFRESH_KEY = "refresh_token"
BOOTSTRAP_KEY = "bootstrap_fingerprint"
ACCESS_KEY = "access_token"  # stored only when shared by several replicas
EXPIRES_KEY = "access_expires_at"
EXPIRY_MARGIN = 30.0  # refresh this long before the access token would expire


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class _Unsaved:
    """A renewal whose rotated refresh token is not on disk yet."""

    rows: dict[str, str]  # ``cursors`` rows of AUTH_SOURCE to write together
    access: str
    expires_at: float


class DiadocAuth:
    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        token_url: str,
        client_id: str,
        client_secret: str,
        bootstrap_refresh_token: str | None,
        state: StateStore,
        metrics: DiadocMetrics,
        timeout: float = 30.0,
        exclusive: Callable[[], AbstractAsyncContextManager[None]] | None = None,
    ) -> None:
        self._http = http
        self._url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self._bootstrap = bootstrap_refresh_token or None
        self._state = state
        self._metrics = metrics
        self._timeout = timeout
        self._exclusive = exclusive
        self._lock = asyncio.Lock()
        self._access: str | None = None
        self._expires_at = 0.0
        self._unsaved: _Unsaved | None = None
        self._renewal: asyncio.Task[str] | None = None
        self.refreshes = 0

    async def token(self) -> str:
        access = self._access
        fresh = time.time() < self._expires_at - EXPIRY_MARGIN
        if access is not None and fresh and self._unsaved is None:
            return access
        return await self.refresh(failed_token=access)

    async def refresh(self, *, failed_token: str | None) -> str:
        """A new access token, unless another caller already replaced ``failed_token``."""
        async with self._lock:
            renewal = self._renewal
            if renewal is not None and not renewal.done():
                # Its caller was cancelled mid-way; the renewal itself was not (see below).
                await asyncio.gather(asyncio.shield(renewal), return_exceptions=True)
            if self._unsaved is None and self._access not in (None, failed_token):
                assert self._access is not None
                return self._access
            # Shielded: once the provider rotated the refresh token, the new one must reach the
            # state file even if the pass that asked is cancelled.
            renewal = self._renewal = asyncio.create_task(self._renew(), name="diadoc oidc")
            renewal.add_done_callback(_retrieve)
            return await asyncio.shield(renewal)

    async def settle(self) -> None:
        """Wait for a renewal still running for a cancelled caller (before closing the state)."""
        if self._renewal is not None:
            await asyncio.gather(self._renewal, return_exceptions=True)

    async def _renew(self) -> str:
        if self._exclusive is None:
            return await self._renew_here(shared=False)
        async with self._exclusive():
            return await self._renew_here(shared=True)

    async def _renew_here(self, *, shared: bool) -> str:
        if self._unsaved is not None:
            access = await self._store()
            if time.time() < self._expires_at - EXPIRY_MARGIN:
                return access
        if shared and (adopted := await self._adopt()) is not None:
            return adopted
        return await self._rotate()

    async def _adopt(self) -> str | None:
        """The access token another replica stored since ours failed, if it is still fresh."""
        access = await self._state.source_secret(AUTH_SOURCE, ACCESS_KEY)
        raw = await self._state.cursor(AUTH_SOURCE, EXPIRES_KEY)
        try:
            expires_at = float(raw) if raw is not None else 0.0
        except ValueError:
            expires_at = 0.0
        if access is None or access == self._access:
            return None
        if time.time() >= expires_at - EXPIRY_MARGIN:
            return None
        self._access, self._expires_at = access, expires_at
        return access

    async def _rotate(self) -> str:
        refresh_token, from_bootstrap = await self._refresh_token()
        try:
            access, expires_in, rotated = await self._exchange(refresh_token)
        except UpstreamError:
            self._metrics.token_refreshes.labels(outcome="failed").inc()
            raise
        rows: dict[str, str] = {}
        if rotated is not None and rotated != refresh_token:
            rows[REFRESH_KEY] = rotated
        elif from_bootstrap:
            rows[REFRESH_KEY] = refresh_token
        if from_bootstrap and self._bootstrap is not None:
            rows[BOOTSTRAP_KEY] = fingerprint(self._bootstrap)
        if self._exclusive is not None:
            # For the other replicas: they adopt it instead of renewing again.
            rows[ACCESS_KEY] = access
            rows[EXPIRES_KEY] = repr(time.time() + expires_in)
        self._unsaved = _Unsaved(rows, access, time.time() + expires_in)
        access = await self._store()
        self.refreshes += 1
        self._metrics.token_refreshes.labels(outcome="ok").inc()
        log.info("diadoc access token refreshed", extra={"expires_in_s": round(expires_in)})
        return access

    async def _store(self) -> str:
        """Write the pending rows, then (only then) make their access token the current one."""
        pending = self._unsaved
        assert pending is not None
        if pending.rows:
            try:
                await self._state.set_source_values(
                    AUTH_SOURCE, pending.rows, secret={REFRESH_KEY, ACCESS_KEY}
                )
            except StateError:
                log.error(
                    "diadoc refresh token rotated but not stored; kept in memory and stored "
                    "before the next request"
                )
                raise
        self._unsaved = None
        self._access, self._expires_at = pending.access, pending.expires_at
        return pending.access

    async def _refresh_token(self) -> tuple[str, bool]:
        """The refresh token to use, and whether it is the bootstrap variable's.

        The stored token wins over ``BRIDGE_DIADOC_REFRESH_TOKEN`` (which is dead after its first
        rotation), unless the variable now holds a token never used before: an operator who
        issues a new one after the old chain broke should not have to edit the state file.
        """
        stored = await self._state.source_secret(AUTH_SOURCE, REFRESH_KEY)
        if self._bootstrap is not None:
            used = await self._state.cursor(AUTH_SOURCE, BOOTSTRAP_KEY)
            if stored is None or used != fingerprint(self._bootstrap):
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


def _retrieve(task: asyncio.Task[str]) -> None:
    # A renewal whose caller was cancelled may fail unobserved; its error was counted already.
    if not task.cancelled():
        task.exception()
