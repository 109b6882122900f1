"""One emulated portal with one installed application: every piece of state, in one place.

All of it is touched only from the emulator's event loop.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from bridge.emulators.bitrix24 import notices
from bridge.emulators.bitrix24.config import APP_VERSION, EmulatorConfig
from bridge.emulators.bitrix24.faults import Faults
from bridge.emulators.bitrix24.limits import LeakyBucket
from bridge.emulators.bitrix24.notify import Notifier
from bridge.emulators.bitrix24.oauth import Tokens
from bridge.emulators.bitrix24.operating import LoadLimiter
from bridge.emulators.bitrix24.queue import OfflineStore

__all__ = ["APP_VERSION", "Incoming", "OnlineBinding", "Portal", "Target"]


@dataclass(frozen=True, slots=True)
class OnlineBinding:
    id: int  # the row's ID: notifications carry it as event_handler_id
    event: str
    handler: str
    auth_type: int
    min_timeout: float | None


@dataclass(frozen=True, slots=True)
class Target:
    """Where a notification goes, and the binding that sends it there."""

    url: str
    min_timeout: float
    handler_id: int


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
        self.operating = LoadLimiter(config.operating_limit)
        self.notifier = Notifier()
        self.faults = Faults()
        self.offline: set[tuple[str, str]] = set()  # (EVENT, connector)
        self.online: list[OnlineBinding] = []
        self.calls: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.last_offline_notice: float | None = None
        self.suppressed = 0
        self.time_shift = 0.0  # moved by the control API: the portal's clock, not the host's
        self._binding_ids = itertools.count(1)
        # --handler stands for bindings made at install (the install URL is one, ONAPPINSTALL's):
        # they have IDs like any other binding.
        self._implicit: dict[str, int] = {}
        self._cleaned_at = self.now()
        self.cleaned = 0
        self.delivered = 0  # rows event.offline.get handed out
        self.cleared = 0  # rows the application deleted: event.offline.get clear=1 or .clear

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
        self.delivered = self.cleared = 0

    # -- where the portal is ---------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self.faults.moved_to or self.config.base_url

    @property
    def domain(self) -> str:
        return urlsplit(self.base_url).netloc

    @property
    def client_endpoint(self) -> str:
        return f"{self.base_url}/rest/"

    # -- portal activity ------------------------------------------------------------------------

    def is_bound(self, event: str, connector: str) -> bool:
        return self.config.auto_bind or (event.upper(), connector) in self.offline

    def add_events(self, events: Iterable[Incoming], connector: str) -> dict[str, int]:
        queue = self.store.queue(connector)
        counts = {"added": 0, "coalesced": 0, "ignored": 0}
        last_user = None
        now = self.now()
        self.clean_if_due(now)
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
        now = self.now()
        if self.last_offline_notice is not None and (
            now - self.last_offline_notice < target.min_timeout
        ):
            self.suppressed += 1
            return
        self.last_offline_notice = now
        self.notifier.fire(target.url, notices.offline(self, target.handler_id, user_id))

    def new_binding_id(self) -> int:
        return next(self._binding_ids)

    def implicit_binding(self, event: str) -> int:
        found = self._implicit.get(event)
        if found is None:
            found = self._implicit[event] = self.new_binding_id()
        return found

    def handler_for(self, event: str) -> Target | None:
        for binding in self.online:
            if binding.event == event:
                timeout = binding.min_timeout
                return Target(
                    binding.handler,
                    self.config.min_timeout if timeout is None else timeout,
                    binding.id,
                )
        if self.config.handler_url:
            return Target(
                self.config.handler_url, self.config.min_timeout, self.implicit_binding(event)
            )
        return None

    def clean_if_due(self, now: float) -> None:
        """The cleanup agent runs now and then; the emulator runs it when a request comes."""
        if now - self._cleaned_at >= self.config.cleanup_interval:
            self.clean(now)

    def clean(self, now: float) -> int:
        self._cleaned_at = now
        removed = sum(queue.clean(now) for queue in self.store.queues.values())
        self.cleaned += removed
        return removed

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
