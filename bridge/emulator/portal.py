"""One emulated portal with one installed application: every piece of state, in one place.

All of it is touched only from the emulator's event loop.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bridge.emulator.config import EmulatorConfig
from bridge.emulator.limits import LeakyBucket, OperatingTime
from bridge.emulator.notify import Notifier
from bridge.emulator.oauth import TokenPair, Tokens
from bridge.emulator.queue import OfflineStore

APP_VERSION = 1


@dataclass(frozen=True, slots=True)
class OnlineBinding:
    event: str
    handler: str
    auth_type: int
    min_timeout: float | None


@dataclass
class Faults:
    latency_ms: float | None = None  # None: the configured latency
    fail: dict[str, int] = field(default_factory=dict)
    fail_with: dict[str, tuple[str, int]] = field(default_factory=dict)
    drop_next_reservation: bool = False

    def take_failure(self, method: str) -> str | None:
        """The error code the next call of ``method`` must answer with, if one is injected."""
        if self.fail.get(method, 0) > 0:
            self.fail[method] -= 1
            return "INTERNAL_SERVER_ERROR"
        code, count = self.fail_with.get(method, ("", 0))
        if count > 0:
            self.fail_with[method] = (code, count - 1)
            return code
        return None


@dataclass(frozen=True, slots=True)
class Incoming:
    event: str
    data: Any
    user_id: int


class Portal:
    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.tokens = Tokens(config)
        self.store = OfflineStore(config.utc_offset_minutes)
        self.bucket = LeakyBucket(config.rate_limit, config.rate_burst)
        self.operating = OperatingTime(config.operating_budget)
        self.notifier = Notifier()
        self.faults = Faults()
        self.offline: set[tuple[str, str]] = set()  # (EVENT, connector)
        self.online: list[OnlineBinding] = []
        self.calls: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.last_offline_notice: float | None = None
        self.suppressed = 0
        self.time_shift = 0.0  # moved by the control API: the portal's clock, not the host's

    def now(self) -> float:
        return self.config.clock() + self.time_shift

    @staticmethod
    def perf() -> float:
        return time.perf_counter()

    def is_admin(self, user_id: int) -> bool:
        return user_id in self.config.admin_user_ids

    def reset(self) -> None:
        """Empty queues, counters, limits and faults; bindings and tokens survive."""
        self.store.clear()
        self.bucket.reset()
        self.operating.reset()
        self.faults = Faults()
        self.calls.clear()
        self.errors.clear()
        self.notifier.stats.clear()
        self.last_offline_notice = None
        self.suppressed = 0

    # -- portal activity ------------------------------------------------------------------------

    def is_bound(self, event: str, connector: str) -> bool:
        return self.config.auto_bind or (event.upper(), connector) in self.offline

    def add_events(self, events: Iterable[Incoming], connector: str) -> dict[str, int]:
        queue = self.store.queue(connector)
        counts = {"added": 0, "coalesced": 0, "ignored": 0}
        last_user = None
        now = self.now()
        for item in events:
            if not self.is_bound(item.event, connector):
                counts["ignored"] += 1
                continue
            merged = queue.add(item.event, item.data, item.user_id, now)
            counts["coalesced" if merged else "added"] += 1
            last_user = item.user_id
        if last_user is not None:
            self.offline_event_happened(last_user)
        return counts

    def offline_event_happened(self, user_id: int | None) -> None:
        """ONOFFLINEEVENT is edge-triggered: once, then silence for minTimeout seconds."""
        target = self.handler_for("ONOFFLINEEVENT")
        if target is None:
            return
        url, min_timeout = target
        now = self.now()
        if self.last_offline_notice is not None and now - self.last_offline_notice < min_timeout:
            self.suppressed += 1
            return
        self.last_offline_notice = now
        self.notifier.fire(url, self.offline_notice(user_id))

    def handler_for(self, event: str) -> tuple[str, float] | None:
        for binding in self.online:
            if binding.event == event:
                timeout = binding.min_timeout
                return binding.handler, self.config.min_timeout if timeout is None else timeout
        if self.config.handler_url:
            return self.config.handler_url, self.config.min_timeout
        return None

    # -- notification bodies ------------------------------------------------------------------

    def _auth(self) -> dict[str, Any]:
        config = self.config
        return {
            "domain": config.domain,
            "client_endpoint": config.client_endpoint,
            "server_endpoint": config.server_endpoint,
            "member_id": config.member_id,
            "application_token": config.application_token,
            "status": "L",
        }

    def _user_auth(self, pair: TokenPair) -> dict[str, Any]:
        return {
            "access_token": pair.access_token,
            "expires": pair.expires,
            "expires_in": int(self.config.token_ttl),
            "scope": self.config.scope,
            "refresh_token": pair.refresh_token,
            "user_id": pair.user_id,
        }

    def offline_notice(self, user_id: int | None) -> dict[str, Any]:
        auth = self._auth()
        if user_id is not None:
            # The user whose action caused it, who need not be an administrator.
            auth.update(self._user_auth(self.tokens.issue(user_id, self.now())))
        return {"event": "ONOFFLINEEVENT", "data": "", "ts": int(self.now()), "auth": auth}

    def install_notice(self, user_id: int = 1) -> dict[str, Any]:
        pair = self.tokens.issue(user_id, self.now())
        data = {"VERSION": APP_VERSION, "ACTIVE": "Y", "INSTALLED": "Y", "LANGUAGE_ID": "en"}
        auth = {**self._auth(), **self._user_auth(pair)}
        return {"event": "ONAPPINSTALL", "data": data, "ts": int(self.now()), "auth": auth}

    def uninstall_notice(self, clean: bool) -> dict[str, Any]:
        data = {"CLEAN": int(clean)}
        return {
            "event": "ONAPPUNINSTALL",
            "data": data,
            "ts": int(self.now()),
            "auth": self._auth(),
        }

    def install(self) -> None:
        """A (re)install: bindings vanish, as on a real portal."""
        self.offline.clear()
        self.online.clear()

    def uninstall(self, clean: bool) -> None:
        self.offline.clear()
        self.online.clear()
        self.tokens.revoke_all()
        if clean:
            self.store.clear()
