"""The emulated OpenID Connect provider: a refresh-token grant whose refresh tokens rotate."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping

from bridge.emulators.diadoc.faults import Answer


def secret() -> str:
    return secrets.token_urlsafe(24)


class Identity:
    """Access tokens with an expiry and rotating refresh tokens; the caller holds the lock."""

    def __init__(
        self,
        *,
        client_id: str,
        client_secret: str,
        token_ttl: float,
        rotate_refresh_tokens: bool,
        clock: Callable[[], float],
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.token_ttl = token_ttl
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.clock = clock
        self.access: dict[str, float] = {}
        self.refresh_tokens: set[str] = set()
        self.refreshes = 0
        self.refused_refreshes = 0

    def issue_refresh_token(self) -> str:
        token = secret()
        self.refresh_tokens.add(token)
        return token

    def valid(self, authorization: str) -> bool:
        scheme, _, token = authorization.partition(" ")
        expires = self.access.get(token.strip()) if scheme.lower() == "bearer" else None
        return expires is not None and expires > self.clock()

    def token(self, form: Mapping[str, str]) -> Answer:
        if form.get("grant_type") != "refresh_token":
            return Answer(400, {"error": "unsupported_grant_type"})
        if (
            form.get("client_id") != self.client_id
            or form.get("client_secret") != self.client_secret
        ):
            self.refused_refreshes += 1
            return Answer(401, {"error": "invalid_client"})
        old = form.get("refresh_token", "")
        if old not in self.refresh_tokens:
            self.refused_refreshes += 1
            return Answer(400, {"error": "invalid_grant"})
        access = secret()
        self.access[access] = self.clock() + self.token_ttl
        refresh = old
        if self.rotate_refresh_tokens:
            self.refresh_tokens.discard(old)
            refresh = secret()
            self.refresh_tokens.add(refresh)
        self.refreshes += 1
        return Answer(
            200,
            {
                "access_token": access,
                "token_type": "Bearer",
                "expires_in": int(self.token_ttl),
                "refresh_token": refresh,
                "scope": "openid offline_access Diadoc.PublicAPI",
            },
        )
