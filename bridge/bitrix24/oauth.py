"""The Bitrix24 OAuth server: exchanging a refresh token for a new token pair."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from bridge.core.errors import TokenError, TransientError, UpstreamError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Grant:
    """What the OAuth server answered: the only trusted source of a portal's identity."""

    access_token: str
    refresh_token: str
    expires_at: float
    member_id: str
    client_endpoint: str
    server_endpoint: str
    domain: str

    def __repr__(self) -> str:
        return f"Grant(member_id={self.member_id!r}, domain={self.domain!r})"


def portal_domain(client_endpoint: str) -> str:
    """The portal's host as its ``client_endpoint`` names it, with the port if it has one."""
    return urlsplit(client_endpoint).netloc


class OAuthClient:
    def __init__(
        self, http: httpx.AsyncClient, *, oauth_url: str, client_id: str, client_secret: str
    ) -> None:
        self._http = http
        self._url = f"{oauth_url.rstrip('/')}/oauth/token/"
        self._client_id = client_id
        self._client_secret = client_secret

    async def refresh(
        self, refresh_token: str, *, headers: Mapping[str, str] | None = None
    ) -> Grant:
        params = {
            "grant_type": "refresh_token",
            "client_id": self._client_id,
            "client_secret": self._client_secret,
            "refresh_token": refresh_token,
        }
        try:
            response = await self._http.get(self._url, params=params, headers=headers)
        except httpx.HTTPError as exc:
            # Never format the request: its URL carries the secret and the token.
            raise TransientError("oauth_unreachable", type(exc).__name__, method="oauth") from None
        try:
            body: Any = response.json()
        except ValueError:
            raise TransientError(
                "oauth_bad_answer", f"HTTP {response.status_code}, not JSON", method="oauth"
            ) from None
        if not isinstance(body, dict):
            raise TransientError("oauth_bad_answer", "not an object", method="oauth")
        error = body.get("error")
        if error:
            code = str(error)
            if code in ("invalid_grant", "invalid_client", "invalid_request", "invalid_scope"):
                raise TokenError(code, "the OAuth server refused the refresh token", method="oauth")
            if response.status_code >= 500:
                raise TransientError(code, method="oauth")
            raise UpstreamError(code, method="oauth")
        return _grant(body)


def _grant(body: dict[str, Any]) -> Grant:
    try:
        access = str(body["access_token"])
        refresh = str(body["refresh_token"])
        member_id = str(body["member_id"])
        client_endpoint = str(body["client_endpoint"])
        expires_in = float(body.get("expires_in", 3600))
    except (KeyError, TypeError, ValueError, OverflowError):
        raise TransientError("oauth_bad_answer", "missing fields", method="oauth") from None
    if not math.isfinite(expires_in):
        raise TransientError("oauth_bad_answer", "malformed expires_in", method="oauth")
    parts = urlsplit(client_endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc or not access or not refresh:
        raise TransientError("oauth_bad_answer", "malformed fields", method="oauth")
    if not client_endpoint.endswith("/"):
        client_endpoint += "/"
    return Grant(
        access_token=access,
        refresh_token=refresh,
        expires_at=time.time() + expires_in,
        member_id=member_id,
        client_endpoint=client_endpoint,
        server_endpoint=str(body.get("server_endpoint", "")),
        domain=portal_domain(client_endpoint),
    )
