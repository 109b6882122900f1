"""Many portals in one process, behind one OAuth server, as one application installed on each.

Each portal is a whole :class:`Portal` of its own (member_id, domain, application token, offline
queue, limits, notifications) and listens on its own loopback address with the farm's one port:
portal 1 on ``--host``, portal 2 on the next address, and so on (``127.0.0.1``, ``127.0.0.2``,
...: Linux routes all of ``127.0.0.0/8`` to the loopback interface). So every portal has its own
domain, as on Bitrix24, and clients need nothing but its ``client_endpoint``. The OAuth server
at ``/oauth/token/`` answers on every address, as ``oauth.bitrix.info`` answers for every
portal: the refresh token says whose it is. A farm of one portal is the single-portal emulator.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import secrets
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from bridge.emulators.bitrix24.calllog import CallLog
from bridge.emulators.bitrix24.config import EmulatorConfig
from bridge.emulators.bitrix24.oauth import OAuthError
from bridge.emulators.bitrix24.portal import Portal

MAX_PORTALS = 10_000


def addresses(host: str, count: int) -> list[str]:
    """The address of each portal: ``host`` and the ``count - 1`` loopback addresses after it."""
    if not 1 <= count <= MAX_PORTALS:
        raise ValueError(f"the number of portals must be within 1..{MAX_PORTALS}")
    if count == 1:
        return [host]
    try:
        first = ipaddress.IPv4Address(host)
    except ValueError:
        first = None
    if first is None or not first.is_loopback or not (first + count - 1).is_loopback:
        raise ValueError(
            "more than one portal needs --host on 127.0.0.0/8 with room for every portal "
            "(each portal listens on its own loopback address)"
        )
    return [str(first + n) for n in range(count)]


def portal_configs(config: EmulatorConfig, count: int) -> list[EmulatorConfig]:
    """Portal 1 is ``config``; the others share the application (client id and secret) and
    everything else, with their own address, member_id and application token."""
    if count > 1 and config.public_host:
        raise ValueError("a farm of portals announces its loopback addresses: drop --public-host")
    hosts = addresses(config.host, count)
    return [config] + [
        dataclasses.replace(
            config,
            host=host,
            member_id=secrets.token_hex(16),
            application_token=secrets.token_hex(16),
        )
        for host in hosts[1:]
    ]


class Farm:
    def __init__(self, portals: Sequence[Portal], call_log: CallLog | None = None) -> None:
        if not portals:
            raise ValueError("a farm needs a portal")
        self.portals = list(portals)
        self.call_log = call_log if call_log is not None else CallLog()
        self._by_address = {portal.config.host: portal for portal in self.portals}
        self._by_member = {portal.config.member_id: portal for portal in self.portals}
        # OAuth errors for refresh tokens no portal issued (or for a bad request without one).
        self.unattributed: Counter[str] = Counter()

    @classmethod
    def of(cls, config: EmulatorConfig, count: int, call_log: CallLog | None = None) -> Farm:
        return cls([Portal(c) for c in portal_configs(config, count)], call_log)

    @property
    def oauth_url(self) -> str:
        """Where the one OAuth server is (it answers on every portal's address too)."""
        return self.portals[0].config.base_url

    def portal_at(self, host: str, server: tuple[str, int] | None) -> Portal | None:
        """The portal a request is for: the one that moved to its ``Host``, else the one on the
        address it reached. A farm of one answers on any address, as the single emulator did."""
        if len(self.portals) == 1:
            return self.portals[0]
        for portal in self.portals:
            if portal.faults.moved_to is not None and portal.domain == host:
                return portal
        return self._by_address.get(server[0]) if server else None

    def find(self, key: str) -> Portal | None:
        """A portal by member_id or by number (1 is the first)."""
        found = self._by_member.get(key)
        if found is None and key.isdigit() and 1 <= int(key) <= len(self.portals):
            found = self.portals[int(key) - 1]
        return found

    def refresh(self, params: Mapping[str, Any]) -> tuple[Portal | None, dict[str, Any]]:
        """Exchange a refresh token; the portal it belongs to, if any portal issued it, and the
        answer. Raises :class:`OAuthError` with ``portal`` set the same way."""
        token = str(params.get("refresh_token") or "")
        owner = next((p for p in self.portals if token and p.tokens.knows(token)), None)
        # Every portal checks the one application's credentials alike; an unknown token fails.
        portal = owner or self.portals[0]
        try:
            pair = portal.tokens.refresh(dict(params), portal.now())
        except OAuthError as exc:
            (owner.errors if owner is not None else self.unattributed)[exc.code] += 1
            raise FarmOAuthError(exc, owner) from None
        return owner, portal.tokens.answer(pair, portal.client_endpoint)

    def close(self) -> None:
        self.call_log.close()


class FarmOAuthError(OAuthError):
    def __init__(self, error: OAuthError, portal: Portal | None) -> None:
        super().__init__(error.code, error.description, error.status)
        self.portal = portal
