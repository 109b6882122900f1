"""The bridge's errors.

BridgeError
├── NotConfirmed           some events of a page were not confirmed; they stay upstream
├── ConfigError            bad or missing configuration; one line for the operator
├── StateError             the state file cannot be read or written
├── LeaseLost              this replica no longer holds the shard (scaled mode): stop, write nothing
├── BrokerUnavailable      RabbitMQ cannot be reached
└── UpstreamError          a Bitrix24 call failed; ``code`` is Bitrix24's ``error``
    ├── TransientError     worth retrying after a pause (rate limits, 5xx, network)
    │   └── OutcomeUnknown the request may have been executed; its answer was lost
    ├── TokenError         the stored tokens are no longer usable (reinstall needed)
    └── PortalStopped      a configuration error; the portal's drain stops, and is re-checked
                           after ``recheck_after`` seconds (never when None)
"""

from __future__ import annotations


class BridgeError(Exception):
    """Base of every error the bridge raises on purpose."""


class ConfigError(BridgeError):
    pass


class StateError(BridgeError):
    pass


class LeaseLost(BridgeError):
    pass


class BrokerUnavailable(BridgeError):
    pass


class UpstreamError(BridgeError):
    def __init__(self, code: str, description: str = "", *, method: str = "") -> None:
        self.code = code
        self.description = description
        self.method = method
        where = f"{method}: " if method else ""
        tail = f" ({description})" if description else ""
        super().__init__(f"{where}{code}{tail}")


class TransientError(UpstreamError):
    def __init__(
        self,
        code: str,
        description: str = "",
        *,
        method: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(code, description, method=method)
        self.retry_after = retry_after


class OutcomeUnknown(TransientError):
    pass


class TokenError(UpstreamError):
    pass


class PortalStopped(UpstreamError):
    def __init__(
        self,
        code: str,
        description: str = "",
        *,
        method: str = "",
        recheck_after: float | None = None,
    ) -> None:
        super().__init__(code, description, method=method)
        self.recheck_after = recheck_after


class NotConfirmed(BridgeError):
    """Some events of a page were not confirmed; they stay reserved for the next pass."""
