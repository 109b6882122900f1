"""What the emulated Diadoc answers, and the faults a test can put in its way."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ERROR_HEADER = "X-Diadoc-ErrorCode"


@dataclass
class FaultRule:
    """Let ``after`` requests through, then answer ``count`` of them with ``status``.

    ``expire_tokens`` instead expires every access token at that point (the next request with
    one gets 401), which puts a token expiry between two pages.
    """

    status: int = 503
    count: int = 1
    after: int = 0
    error_code: str = ""
    retry_after: str | float | None = None  # seconds, or an HTTP date
    expire_tokens: bool = False

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FaultRule:
        retry_after = data.get("retry_after")
        return cls(
            status=int(data.get("status", 503)),
            count=max(1, int(data.get("count", 1))),
            after=max(0, int(data.get("after", 0))),
            error_code=str(data.get("error_code", "")),
            retry_after=retry_after if isinstance(retry_after, str) else _seconds(retry_after),
            expire_tokens=bool(data.get("expire_tokens", False)),
        )

    def answer(self) -> Answer:
        headers = {ERROR_HEADER: self.error_code} if self.error_code else {}
        if isinstance(self.retry_after, str):
            headers["Retry-After"] = self.retry_after
        elif self.retry_after is not None:
            headers["Retry-After"] = f"{self.retry_after:g}"
        return Answer(self.status, {"error": self.error_code or "injected"}, headers)


def _seconds(value: object) -> float | None:
    if value is None:
        return None
    if not isinstance(value, int | float):
        raise TypeError("retry_after must be seconds or an HTTP date")
    return float(value)


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: Any
    headers: Mapping[str, str] = field(default_factory=dict)
    raw: bytes | None = None  # a body that is not JSON (protobuf), with its media type
    media_type: str = "application/json"


def error(status: int, code: str, text: str = "") -> Answer:
    return Answer(status, {"error": code, "message": text or code}, {ERROR_HEADER: code})
