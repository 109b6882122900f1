"""What an emulated portal looks like: limits, credentials, timing."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field

APP_VERSION = 1  # the installed application's version


def _token(length: int = 32) -> str:
    return secrets.token_hex(length // 2)


class FakeClock:
    """A wall clock tests move by hand; safe to advance from another thread."""

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


@dataclass
class EmulatorConfig:
    host: str = "127.0.0.1"
    port: int = 0
    # Default target of notifications: the local application's install URL, and the
    # ONOFFLINEEVENT / ONAPPUNINSTALL handler while none is bound with event.bind.
    handler_url: str | None = None
    min_timeout: float = 1.0
    # Leaky bucket: drains `rate_limit` per second, refuses above `rate_burst`; 0/None = off.
    rate_limit: float | None = 2.0
    rate_burst: int = 50
    token_ttl: float = 3600.0
    refresh_ttl: float = 180 * 86400.0
    # Operating seconds per method in a sliding ten minutes (LoadLimiter v2: 420; older
    # portals 480). Each call is charged its real processing time plus these modelled costs,
    # so benchmarks can mimic a loaded portal; a batch's own time includes its commands'.
    operating_limit: float = 420.0
    op_cost_per_call: float = 0.0
    op_cost_per_row: float = 0.0
    latency_ms: float = 0.0
    offline_extended: bool = True
    auth_connector_feature: bool = True
    # Treat every event name as bound offline (for every connector). Real portals queue only
    # events the application bound with event_type=offline; keep False to test binding.
    auto_bind: bool = False
    client_id: str = field(default_factory=lambda: f"local.{_token(14)}.{_token(8)}")
    client_secret: str = field(default_factory=lambda: _token(50))
    application_token: str = field(default_factory=_token)
    member_id: str = field(default_factory=_token)
    scope: str = "crm"
    admin_user_ids: frozenset[int] = frozenset({1})
    # Real portals answer in their own time zone; a non-UTC default keeps clients honest.
    utc_offset_minutes: int = 180
    # A real OAuth answer names the OAuth server in `domain` and `server_endpoint`, not the
    # portal; the portal is only in `client_endpoint`.
    oauth_domain: str = "oauth.bitrix.info"
    clock: Callable[[], float] = time.time
    # The host clients reach the portal by, when it listens on a wildcard address.
    public_host: str | None = None
    # Serve HTTPS with this certificate and key (PEM files): for clients that only speak https,
    # such as Bitrix24's own SDKs.
    tls_certfile: str | None = None
    tls_keyfile: str | None = None
    # How often the queue's cleanup agent runs, in portal seconds (it also runs on demand).
    cleanup_interval: float = 86400.0
    # The former name of operating_limit, still accepted.
    operating_budget: InitVar[float | None] = None

    def __post_init__(self, operating_budget: float | None) -> None:
        if operating_budget is not None:
            self.operating_limit = operating_budget

    @property
    def domain(self) -> str:
        host = self.public_host or self.host
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{self.port}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls_certfile else "http"

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.domain}"

    @property
    def client_endpoint(self) -> str:
        return f"{self.base_url}/rest/"

    @property
    def server_endpoint(self) -> str:
        return f"https://{self.oauth_domain}/rest/"
