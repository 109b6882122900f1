"""Faults a test injects through ``POST /_emulator/faults``: errors, latency, lost answers, a move.

An injected error is answered by the next calls of one method (``"*"``: of every method), plain
or inside a ``batch`` (there it lands in ``result_error``); it counts down, or stays until cleared.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from bridge.emulators.bitrix24.errors import STATUS, RestError

EVERY_METHOD = "*"


@dataclass(slots=True)
class Injected:
    code: str
    remaining: int | None  # None: until cleared
    status: int | None = None  # None: the code's usual status
    description: str | None = None

    def view(self) -> dict[str, Any]:
        return {
            "error": self.code,
            "count": self.remaining,
            "persistent": self.remaining is None,
            "status": self.status if self.status is not None else STATUS.get(self.code, 400),
        }


@dataclass
class Faults:
    latency_ms: float | None = None  # None: the configured latency
    errors: dict[str, Injected] = field(default_factory=dict)  # method or "*"
    drop_next_reservation: bool = False
    # The portal moved: REST requests to any other host are redirected to this base URL.
    moved_to: str | None = None

    def take(self, method: str) -> RestError | None:
        """The error the next call of ``method`` must answer with, if one is injected."""
        for key in (method, EVERY_METHOD):
            rule = self.errors.get(key)
            if rule is None:
                continue
            if rule.remaining is not None:
                rule.remaining -= 1
                if rule.remaining <= 0:
                    del self.errors[key]
            return RestError(rule.code, rule.description, status=rule.status)
        return None

    def apply(self, body: Mapping[str, Any]) -> None:
        """Change faults as ``body`` says; raises ValueError/TypeError/KeyError on nonsense."""
        if body.get("clear"):
            self.errors.clear()
            self.latency_ms = None
            self.drop_next_reservation = False
            self.moved_to = None
        if "latency_ms" in body:
            latency = body["latency_ms"]
            self.latency_ms = None if latency is None else max(0.0, float(latency))
        for method, count in dict(body.get("fail") or {}).items():
            # The older shape: {"method": N} fails the next N calls with a 500.
            self._set(str(method), {"error": "INTERNAL_SERVER_ERROR", "count": count})
        for method, spec in dict(body.get("fail_with") or {}).items():
            self._set(str(method), spec)
        if "drop_next_reservation" in body:
            self.drop_next_reservation = bool(body["drop_next_reservation"])
        if "moved_to" in body:
            self.moved_to = _base_url(body["moved_to"])

    def _set(self, method: str, spec: Any) -> None:
        method = method.strip().lower()
        if spec is None:
            self.errors.pop(method, None)
            return
        if not isinstance(spec, Mapping) or not str(spec.get("error") or ""):
            raise ValueError(f"{method}: a fault needs an 'error' code")
        persistent = bool(spec.get("persistent", False))
        count = None if persistent else int(spec.get("count", 1))
        if count is not None and count <= 0:
            self.errors.pop(method, None)
            return
        status = spec.get("status")
        if status is not None and not 100 <= int(status) <= 599:
            raise ValueError(f"{method}: status {status} is not an HTTP status")
        description = spec.get("description")
        self.errors[method] = Injected(
            str(spec["error"]),
            count,
            None if status is None else int(status),
            None if description is None else str(description),
        )

    def view(self) -> dict[str, Any]:
        return {
            "latency_ms": self.latency_ms,
            "fail_with": {method: rule.view() for method, rule in self.errors.items()},
            "drop_next_reservation": self.drop_next_reservation,
            "moved_to": self.moved_to,
            "known_errors": sorted(STATUS),
        }


def _base_url(value: Any) -> str | None:
    if value is None or value == "":
        return None
    parts = urlsplit(str(value))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("moved_to must be an http(s) base URL, e.g. http://localhost:8090")
    return f"{parts.scheme}://{parts.netloc}"
