"""The emulated Diadoc: boxes, their docflow events, OpenID Connect tokens and injected faults.

Everything is guarded by one lock, so tests may call the model directly from their own thread
while the server thread answers requests.

Events are kept in ``IndexKey`` order, which follows the event's ``Timestamp`` (ties by arrival).
A *late* event, filed with a timestamp in the past, therefore sorts behind events that were
already read: a reader that only follows ``AfterIndexKey`` never sees it, as with the real feed.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import secrets
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bridge.diadoc.ticks import to_ticks

_KEY = struct.Struct(">qQ")
ERROR_HEADER = "X-Diadoc-ErrorCode"
MAX_RECORDED = 1000


def _secret() -> str:
    return secrets.token_urlsafe(24)


def encode_index_key(ticks: int, seq: int) -> str:
    return base64.b64encode(_KEY.pack(ticks, seq)).decode()


def decode_index_key(key: str) -> tuple[int, int]:
    try:
        raw = base64.b64decode(key.encode(), validate=True)
        ticks, seq = _KEY.unpack(raw)
    except (binascii.Error, struct.error, ValueError) as exc:
        raise ValueError("IndexKey is malformed") from exc
    return ticks, seq


@dataclass(frozen=True, slots=True)
class StoredEvent:
    ticks: int
    seq: int
    event_id: str
    message_id: str
    entity_id: str
    document_type: str
    previous_event_id: str | None = None

    @property
    def order(self) -> tuple[int, int]:
        return (self.ticks, self.seq)

    @property
    def index_key(self) -> str:
        return encode_index_key(self.ticks, self.seq)

    @property
    def key(self) -> str:
        return f"{self.event_id}:{self.entity_id}"

    def as_json(self, *, populate: bool) -> dict[str, Any]:
        document_id = {"MessageId": self.message_id, "EntityId": self.entity_id}
        event: dict[str, Any] = {
            "EventId": self.event_id,
            "Timestamp": {"Ticks": self.ticks},
            "DocumentId": document_id,
            "IndexKey": self.index_key,
        }
        if self.previous_event_id:
            event["PreviousEventId"] = self.previous_event_id
        if populate:
            event["Document"] = {
                "DocumentId": document_id,
                "LastEvent": {"EventId": self.event_id, "Timestamp": {"Ticks": self.ticks}},
                "DocumentInfo": {
                    "TypeNamedId": self.document_type,
                    "Function": "default",
                    "Version": "v1",
                    "DocumentDirection": "Inbound",
                },
                "Docflow": {},
            }
        return event

    def summary(self) -> dict[str, Any]:
        return {
            "EventId": self.event_id,
            "MessageId": self.message_id,
            "EntityId": self.entity_id,
            "key": self.key,
            "ticks": self.ticks,
            "IndexKey": self.index_key,
            "document_type": self.document_type,
        }


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
    retry_after: float | None = None
    expire_tokens: bool = False

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FaultRule:
        retry_after = data.get("retry_after")
        return cls(
            status=int(data.get("status", 503)),
            count=max(1, int(data.get("count", 1))),
            after=max(0, int(data.get("after", 0))),
            error_code=str(data.get("error_code", "")),
            retry_after=None if retry_after is None else float(retry_after),
            expire_tokens=bool(data.get("expire_tokens", False)),
        )


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: Any
    headers: Mapping[str, str] = field(default_factory=dict)


def _error(status: int, code: str, text: str = "") -> Answer:
    return Answer(status, {"error": code, "message": text or code}, {ERROR_HEADER: code})


class DiadocEmulator:
    def __init__(
        self,
        boxes: tuple[str, ...] = ("box-1",),
        *,
        token_ttl: float = 3600.0,
        rotate_refresh_tokens: bool = True,
        clock: Callable[[], float] = time.time,
        client_id: str = "bridge-test-client",
        client_secret: str | None = None,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret or _secret()
        self.token_ttl = token_ttl
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.clock = clock
        self._lock = threading.Lock()
        self._boxes: dict[str, list[StoredEvent]] = {b: [] for b in boxes}
        self._seq = 0
        self._access: dict[str, float] = {}
        self._refresh: set[str] = set()
        self.rules: list[FaultRule] = []
        self.latency_ms = 0.0
        self.statuses: Counter[int] = Counter()
        self.refreshes = 0
        self.refused_refreshes = 0
        self.requests: list[dict[str, Any]] = []

    # -- control -----------------------------------------------------------------------

    @property
    def boxes(self) -> list[str]:
        with self._lock:
            return list(self._boxes)

    def add_box(self, box_id: str) -> None:
        with self._lock:
            self._boxes.setdefault(box_id, [])

    def _insert(self, box_id: str, event: StoredEvent) -> None:
        events = self._boxes.get(box_id)
        if events is None:
            raise KeyError(f"unknown box {box_id}")
        bisect.insort(events, event, key=lambda e: e.order)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def add_events(
        self,
        box_id: str,
        *,
        count: int = 1,
        document_type: str = "UniversalTransferDocument",
        age_s: float = 0.0,
        documents: int = 1,
    ) -> list[StoredEvent]:
        """``count`` changes, each of a message with ``documents`` documents (one shared EventId).

        ``age_s`` > 0 files them late: their timestamp lies that far in the past.
        """
        added: list[StoredEvent] = []
        with self._lock:
            ticks = to_ticks(self.clock() - age_s)
            for _ in range(count):
                event_id, message_id = str(uuid.uuid4()), str(uuid.uuid4())
                for _ in range(documents):
                    event = StoredEvent(
                        ticks=ticks,
                        seq=self._next_seq(),
                        event_id=event_id,
                        message_id=message_id,
                        entity_id=str(uuid.uuid4()),
                        document_type=document_type,
                    )
                    self._insert(box_id, event)
                    added.append(event)
        return added

    def duplicate(self, box_id: str, key: str | None = None) -> StoredEvent:
        """Deliver an event again (same EventId and document) with a new IndexKey, at the head."""
        with self._lock:
            events = self._boxes[box_id]
            if not events:
                raise KeyError("the box has no events to duplicate")
            source = events[-1] if key is None else next(e for e in events if e.key == key)
            copy = StoredEvent(
                ticks=max(source.ticks, to_ticks(self.clock())),
                seq=self._next_seq(),
                event_id=source.event_id,
                message_id=source.message_id,
                entity_id=source.entity_id,
                document_type=source.document_type,
            )
            self._insert(box_id, copy)
            return copy

    def events(self, box_id: str) -> list[StoredEvent]:
        with self._lock:
            return list(self._boxes[box_id])

    def add_faults(self, rules: list[FaultRule]) -> None:
        with self._lock:
            self.rules.extend(rules)

    def expire_tokens(self) -> None:
        with self._lock:
            self._access.clear()

    def reset(self) -> None:
        with self._lock:
            for events in self._boxes.values():
                events.clear()
            self.rules.clear()
            self.latency_ms = 0.0
            self.statuses.clear()
            self.refreshes = self.refused_refreshes = 0
            self.requests.clear()

    def counters(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": sum(self.statuses.values()),
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "token_refreshes": self.refreshes,
                "refused_refreshes": self.refused_refreshes,
                "events": {b: len(e) for b, e in self._boxes.items()},
                "pending_faults": len(self.rules),
            }

    # -- OpenID Connect ----------------------------------------------------------------

    def issue_refresh_token(self) -> str:
        with self._lock:
            token = _secret()
            self._refresh.add(token)
            return token

    def token(self, form: Mapping[str, str]) -> Answer:
        with self._lock:
            if form.get("grant_type") != "refresh_token":
                return Answer(400, {"error": "unsupported_grant_type"})
            if (
                form.get("client_id") != self.client_id
                or form.get("client_secret") != self.client_secret
            ):
                self.refused_refreshes += 1
                return Answer(401, {"error": "invalid_client"})
            old = form.get("refresh_token", "")
            if old not in self._refresh:
                self.refused_refreshes += 1
                return Answer(400, {"error": "invalid_grant"})
            access = _secret()
            self._access[access] = self.clock() + self.token_ttl
            refresh = old
            if self.rotate_refresh_tokens:
                self._refresh.discard(old)
                refresh = _secret()
                self._refresh.add(refresh)
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

    # -- GetDocflowEvents --------------------------------------------------------------

    def _fault(self) -> Answer | None:
        while self.rules:
            rule = self.rules[0]
            if rule.after > 0:
                rule.after -= 1
                return None
            if rule.expire_tokens:
                self._access.clear()
                self.rules.pop(0)
                continue
            rule.count -= 1
            if rule.count <= 0:
                self.rules.pop(0)
            headers = {ERROR_HEADER: rule.error_code} if rule.error_code else {}
            if rule.retry_after is not None:
                headers = {**headers, "Retry-After": f"{rule.retry_after:g}"}
            return Answer(rule.status, {"error": rule.error_code or "injected"}, headers)
        return None

    def docflow_events(self, box_id: str | None, authorization: str, body: object) -> Answer:
        with self._lock:
            answer = self._docflow_events(box_id, authorization, body)
            self.statuses[answer.status] += 1
            after = body.get("AfterIndexKey") if isinstance(body, dict) else None
            self.requests.append({"box": box_id, "after": after, "status": answer.status})
            del self.requests[:-MAX_RECORDED]
            return answer

    def _docflow_events(self, box_id: str | None, authorization: str, body: object) -> Answer:
        fault = self._fault()
        if fault is not None:
            return fault
        scheme, _, token = authorization.partition(" ")
        expires = self._access.get(token.strip()) if scheme.lower() == "bearer" else None
        if expires is None or expires <= self.clock():
            return _error(401, "Http.Unauthorized", "the access token is missing or expired")
        if not box_id:
            return _error(400, "Http.BadRequest", "boxId is required")
        events = self._boxes.get(box_id)
        if events is None:
            return _error(403, "Http.Forbidden", "no access to this box")
        if not isinstance(body, dict):
            return _error(400, "Http.BadRequest", "the body must be a JSON object")
        try:
            query = _Query.parse(body)
        except ValueError as exc:
            return _error(400, "Http.BadRequest", str(exc))
        matching = [e for e in events if query.low <= e.ticks <= query.high]
        if query.descending:
            matching.reverse()
        start = 0
        if query.after is not None:
            after = query.after
            start = next(
                (
                    i
                    for i, e in enumerate(matching)
                    if (e.order < after if query.descending else e.order > after)
                ),
                len(matching),
            )
        page = matching[start : start + query.limit]
        return Answer(
            200,
            {
                "TotalCount": len(matching),
                "TotalCountType": "Equal",
                "Events": [e.as_json(populate=query.populate) for e in page],
            },
        )


@dataclass(frozen=True, slots=True)
class _Query:
    low: int
    high: int
    descending: bool
    after: tuple[int, int] | None
    limit: int
    populate: bool

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> _Query:
        filt = body.get("Filter")
        if not isinstance(filt, Mapping):
            raise ValueError("Filter is required")
        low = _ticks(filt.get("FromTimestamp"), 0)
        high = _ticks(filt.get("ToTimestamp"), 2**62)
        direction = filt.get("SortDirection", "Ascending")
        if direction not in ("Ascending", "Descending", 1, 2):
            raise ValueError("SortDirection must be Ascending or Descending")
        limit = body.get("Limit", 100)
        if not isinstance(limit, int) or not 1 <= limit <= 100:
            raise ValueError("Limit must be within 1..100")
        raw_after = body.get("AfterIndexKey")
        after = None
        if raw_after is not None:
            if not isinstance(raw_after, str):
                raise ValueError("AfterIndexKey must be a string")
            after = decode_index_key(raw_after)
        if body.get("InjectEntityContent"):
            raise ValueError("the emulator does not inject entity content")
        return cls(
            low=low,
            high=high,
            descending=direction in ("Descending", 2),
            after=after,
            limit=limit,
            populate=bool(body.get("PopulateDocuments", False)),
        )


def _ticks(value: object, default: int) -> int:
    if value is None:
        return default
    ticks = value.get("Ticks") if isinstance(value, Mapping) else None
    if not isinstance(ticks, int) or isinstance(ticks, bool):
        raise ValueError('a Timestamp must be {"Ticks": <integer>}')
    return ticks
