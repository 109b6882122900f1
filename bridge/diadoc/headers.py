"""What Diadoc's response headers say: when to come back, and when an API version goes away.

``Retry-After`` is seconds or an HTTP date (RFC 9110). Kontur announces the removal of a version
with ``Sunset`` (an HTTP date, RFC 8594) and a ``Link`` to its policy
(``howtostart/deprecationPolicy.rst`` of ``diadoc/diadocapi-docs``); ``Deprecation`` (RFC 9745,
``@<unix seconds>``; older drafts sent a date or ``true``) is read the same way in case it comes.
"""

from __future__ import annotations

import email.utils
import logging
import time

import httpx

from bridge.diadoc.metrics import DiadocMetrics

log = logging.getLogger(__name__)

NOTICES = ("Sunset", "Deprecation")


def http_time(value: str) -> float | None:
    """Unix time of an HTTP date or an ``@<seconds>`` structured date; None if neither."""
    text = value.strip()
    if text.startswith("@"):
        try:
            return float(int(text[1:]))
        except ValueError:
            return None
    try:
        return email.utils.parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def retry_after(response: httpx.Response | None, now: float | None = None) -> float | None:
    """Seconds the server asks to wait, or None when it does not say."""
    raw = None if response is None else response.headers.get("Retry-After")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    when = http_time(raw)
    if when is None:
        return None
    return max(0.0, when - (time.time() if now is None else now))


class ApiNotices:
    """Counts every answer that announces a retirement; logs each announcement once."""

    def __init__(self, metrics: DiadocMetrics, version: str) -> None:
        self._metrics = metrics
        self._version = version
        self._logged: set[tuple[str, str]] = set()

    def check(self, response: httpx.Response) -> None:
        for header in NOTICES:
            value = response.headers.get(header)
            if value is None:
                continue
            self._metrics.api_notices.labels(version=self._version, header=header.lower()).inc()
            when = http_time(value)
            if header == "Sunset" and when is not None:
                self._metrics.api_sunset.labels(version=self._version).set(when)
            if (header, value) in self._logged:
                continue
            self._logged.add((header, value))
            log.warning(
                "Diadoc announces the retirement of the API version in use; "
                "set BRIDGE_DIADOC_API_VERSION to a current one before that date",
                extra={
                    "api_version": self._version,
                    "header": header,
                    "value": value,
                    "link": response.headers.get("Link", ""),
                },
            )
