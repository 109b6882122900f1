"""Access and refresh tokens: expiring access tokens, strictly rotating refresh tokens."""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from bridge.emulators.bitrix24.config import EmulatorConfig
from bridge.emulators.bitrix24.errors import RestError


@dataclass(slots=True)
class Grant:
    user_id: int
    expires_at: float


@dataclass(frozen=True, slots=True)
class TokenPair:
    access_token: str
    refresh_token: str
    user_id: int
    expires: int


class OAuthError(Exception):
    def __init__(self, code: str, description: str, status: int) -> None:
        super().__init__(description)
        self.code = code
        self.description = description
        self.status = status

    def body(self) -> dict[str, str]:
        return {"error": self.code, "error_description": self.description}


# Refresh tokens already presented, remembered so that one presented again can be told apart
# from one this portal never issued (the OAuth server of a farm names the portal it belongs to).
SPENT_KEPT = 100_000


class Tokens:
    def __init__(self, config: EmulatorConfig) -> None:
        self._config = config
        self._access: dict[str, Grant] = {}
        self._refresh: dict[str, Grant] = {}
        self._spent: OrderedDict[str, None] = OrderedDict()

    def knows(self, refresh_token: str) -> bool:
        """This portal issued the refresh token (alive or already presented)."""
        return refresh_token in self._refresh or refresh_token in self._spent

    def issue(self, user_id: int, now: float) -> TokenPair:
        access, refresh = secrets.token_hex(35), secrets.token_hex(35)
        expires = now + self._config.token_ttl
        self._access[access] = Grant(user_id, expires)
        self._refresh[refresh] = Grant(user_id, now + self._config.refresh_ttl)
        return TokenPair(access, refresh, user_id, int(expires))

    def user_of(self, token: str | None, now: float) -> int:
        """The user an access token belongs to, or the REST error a portal would answer."""
        if not token:
            raise RestError("NO_AUTH_FOUND")
        grant = self._access.get(token)
        if grant is None:
            raise RestError("invalid_token")
        if now >= grant.expires_at:
            raise RestError("expired_token")
        return grant.user_id

    def expire_all(self, now: float) -> None:
        for grant in self._access.values():
            grant.expires_at = min(grant.expires_at, now)

    def revoke_all(self) -> None:
        self._access.clear()
        self._refresh.clear()

    def refresh(self, params: dict[str, Any], now: float) -> TokenPair:
        if params.get("grant_type") != "refresh_token" or not params.get("refresh_token"):
            raise OAuthError("invalid_request", "grant_type=refresh_token is expected", 400)
        if (
            params.get("client_id") != self._config.client_id
            or params.get("client_secret") != self._config.client_secret
        ):
            raise OAuthError("invalid_client", "Invalid client credentials", 401)
        # Rotation is strict: the token is dead from the moment it is presented.
        presented = str(params["refresh_token"])
        grant = self._refresh.pop(presented, None)
        if grant is not None:
            self._spent[presented] = None
            if len(self._spent) > SPENT_KEPT:
                self._spent.popitem(last=False)
        if grant is None or now >= grant.expires_at:
            raise OAuthError("invalid_grant", "Invalid grant", 400)
        return self.issue(grant.user_id, now)

    def answer(self, pair: TokenPair, client_endpoint: str) -> dict[str, Any]:
        """The OAuth server's answer for a token pair of the portal at ``client_endpoint``."""
        config = self._config
        return {
            "access_token": pair.access_token,
            "expires": pair.expires,
            "expires_in": int(config.token_ttl),
            "scope": config.scope,
            "domain": config.oauth_domain,
            "server_endpoint": config.server_endpoint,
            "status": "L",
            "client_endpoint": client_endpoint,
            "member_id": config.member_id,
            "user_id": pair.user_id,
            "refresh_token": pair.refresh_token,
        }
