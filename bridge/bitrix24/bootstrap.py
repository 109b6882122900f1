"""Registering a portal from an OAuth grant, and the bootstrap from ``BRIDGE_PORTAL_URL``."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from bridge.bitrix24.oauth import Grant, OAuthClient
from bridge.core.errors import ConfigError, TokenError, UpstreamError
from bridge.settings import Settings
from bridge.state import ACTIVE, Portal
from bridge.state.open import StateStore

log = logging.getLogger(__name__)


async def store_grant(state: StateStore, grant: Grant, application_token: str) -> Portal:
    portal = Portal(
        member_id=grant.member_id,
        domain=grant.domain,
        client_endpoint=grant.client_endpoint,
        server_endpoint=grant.server_endpoint,
        access_token=grant.access_token,
        refresh_token=grant.refresh_token,
        application_token=application_token,
        expires_at=grant.expires_at,
        status=ACTIVE,
    )
    await state.save_portal(portal)
    return portal


async def bootstrap(settings: Settings, state: StateStore, oauth: OAuthClient) -> Portal | None:
    """Register the portal of ``BRIDGE_PORTAL_URL`` unless the state file already knows it.

    Stored state wins: refresh tokens rotate, so the bootstrap token is dead after first use.
    """
    s = settings
    if not (s.portal_url and s.refresh_token and s.application_token):
        return None
    host = urlsplit(s.portal_url).netloc
    for portal in await state.portals(include_inactive=True):
        if portal.domain == host:
            return None
    try:
        grant = await oauth.refresh(s.refresh_token.get_secret_value())
    except TokenError as exc:
        raise ConfigError(
            f"BRIDGE_REFRESH_TOKEN was refused by the OAuth server ({exc.code})"
        ) from None
    except UpstreamError as exc:
        raise ConfigError(f"cannot bootstrap from BRIDGE_PORTAL_URL: {exc}") from None
    portal = await store_grant(state, grant, s.application_token.get_secret_value())
    log.info("portal bootstrapped", extra={"portal": grant.domain, "member_id": grant.member_id})
    return portal
