"""The emulated Diadoc: boxes, their docflow events, OpenID Connect tokens and injected faults.

Everything is guarded by one lock, so tests may call the model directly from their own thread
while the server thread answers requests.

Events are kept in ``IndexKey`` order, which follows the event's ``Timestamp`` (ties by arrival).
A *late* event, filed with a timestamp in the past, therefore sorts behind events that were
already read: a reader that only follows ``AfterIndexKey`` never sees it, as with the real feed.
Events of one change may share one ``IndexKey`` (a *tie*, as users of the real feed report); a
page that ends inside a tie and is continued with ``AfterIndexKey`` skips the rest of it.
"""

from __future__ import annotations

import bisect
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from bridge.diadoc.ticks import to_ticks
from bridge.emulators.diadoc.events import DEFECTS, HEAD_DEPARTMENT, StoredEvent
from bridge.emulators.diadoc.faults import Answer, FaultRule, error
from bridge.emulators.diadoc.oidc import Identity, secret
from bridge.emulators.diadoc.protobuf import as_protobuf
from bridge.emulators.diadoc.query import Query

MAX_RECORDED = 1000
SERVED_VERSIONS = (3, 4, 5)
# Kontur announces a removal with a Sunset header (``howtostart/deprecationPolicy.rst`` of
# ``diadoc/diadocapi-docs``); V3 of GetDocflowEvents is listed for removal after 3 April 2027.
SUNSET = {3: "Sat, 03 Apr 2027 00:00:00 GMT"}
POLICY_LINK = '<https://developer.kontur.ru/doc/diadoc-api/removal>; rel="sunset"'


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
        self.clock = clock
        self.identity = Identity(
            client_id=client_id,
            client_secret=client_secret or secret(),
            token_ttl=token_ttl,
            rotate_refresh_tokens=rotate_refresh_tokens,
            clock=clock,
        )
        self._lock = threading.Lock()
        self._boxes: dict[str, list[StoredEvent]] = {b: [] for b in boxes}
        # Boxes the account sees only one department of: anything else is 403, as for a user
        # without access to all of the organisation's documents.
        self.departments: dict[str, str] = {}
        self.sunset: dict[int, str] = dict(SUNSET)
        self.deprecation: dict[int, str] = {}
        self._seq = 0
        self.rules: list[FaultRule] = []
        self.latency_ms = 0.0
        self.statuses: Counter[int] = Counter()
        self.requests: list[dict[str, Any]] = []

    # -- control -----------------------------------------------------------------------

    @property
    def boxes(self) -> list[str]:
        with self._lock:
            return list(self._boxes)

    def add_box(self, box_id: str, *, department: str | None = None) -> None:
        with self._lock:
            self._boxes.setdefault(box_id, [])
            if department is not None:
                self.departments[box_id] = department

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
        tied: bool = False,
        department: str = HEAD_DEPARTMENT,
        defect: str | None = None,
    ) -> list[StoredEvent]:
        """``count`` changes, each of a message with ``documents`` documents (one shared EventId).

        ``age_s`` > 0 files them late: their timestamp lies that far in the past. ``tied`` gives
        every event added by this call the same Timestamp and the same IndexKey.
        """
        if defect is not None and defect not in DEFECTS:
            raise ValueError(f"defect must be one of {', '.join(DEFECTS)}")
        added: list[StoredEvent] = []
        with self._lock:
            ticks = to_ticks(self.clock() - age_s)
            tie = self._seq + 1 if tied else 0
            for _ in range(count):
                event_id, message_id = str(uuid.uuid4()), str(uuid.uuid4())
                for _ in range(documents):
                    event = StoredEvent(
                        ticks=ticks,
                        seq=self._next_seq(),
                        key_seq=tie,
                        event_id=event_id,
                        message_id=message_id,
                        entity_id=str(uuid.uuid4()),
                        document_type=document_type,
                        department_id=department,
                        defect=defect,
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
                department_id=source.department_id,
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
            self.identity.access.clear()

    def reset(self) -> None:
        with self._lock:
            for events in self._boxes.values():
                events.clear()
            self.rules.clear()
            self.latency_ms = 0.0
            self.statuses.clear()
            self.identity.refreshes = self.identity.refused_refreshes = 0
            self.requests.clear()

    def counters(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": sum(self.statuses.values()),
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "token_refreshes": self.identity.refreshes,
                "refused_refreshes": self.identity.refused_refreshes,
                "events": {b: len(e) for b, e in self._boxes.items()},
                "pending_faults": len(self.rules),
            }

    # -- OpenID Connect ----------------------------------------------------------------

    @property
    def client_id(self) -> str:
        return self.identity.client_id

    @property
    def client_secret(self) -> str:
        return self.identity.client_secret

    @property
    def refreshes(self) -> int:
        return self.identity.refreshes

    @property
    def refused_refreshes(self) -> int:
        return self.identity.refused_refreshes

    def issue_refresh_token(self) -> str:
        with self._lock:
            return self.identity.issue_refresh_token()

    def token(self, form: Mapping[str, str]) -> Answer:
        with self._lock:
            return self.identity.token(form)

    # -- GetDocflowEvents --------------------------------------------------------------

    def _fault(self) -> Answer | None:
        while self.rules:
            rule = self.rules[0]
            if rule.after > 0:
                rule.after -= 1
                return None
            if rule.expire_tokens:
                self.identity.access.clear()
                self.rules.pop(0)
                continue
            rule.count -= 1
            if rule.count <= 0:
                self.rules.pop(0)
            return rule.answer()
        return None

    def docflow_events(
        self,
        box_id: str | None,
        authorization: str,
        body: object,
        *,
        version: int = 5,
        accept: str = "application/json",
        content_type: str = "application/json",
    ) -> Answer:
        with self._lock:
            answer = self._docflow_events(box_id, authorization, body, version, content_type)
            if answer.status == 200 and "application/json" not in accept.lower():
                answer = as_protobuf(answer)  # unless JSON was asked for, as Kontur's API does
            if version in self.sunset or version in self.deprecation:
                notice = dict(answer.headers)
                if version in self.sunset:
                    notice.update({"Sunset": self.sunset[version], "Link": POLICY_LINK})
                if version in self.deprecation:
                    notice["Deprecation"] = self.deprecation[version]
                answer = Answer(answer.status, answer.body, notice, answer.raw, answer.media_type)
            self.statuses[answer.status] += 1
            after = body.get("AfterIndexKey") if isinstance(body, dict) else None
            self.requests.append(
                {
                    "box": box_id,
                    "after": after,
                    "status": answer.status,
                    "version": version,
                    "body": body,
                }
            )
            del self.requests[:-MAX_RECORDED]
            return answer

    def _docflow_events(
        self, box_id: str | None, authorization: str, body: object, version: int, media: str
    ) -> Answer:
        fault = self._fault()
        if fault is not None:
            return fault
        if version not in SERVED_VERSIONS:
            return error(404, "Http.NotFound", f"no method V{version}/GetDocflowEvents")
        if not self.identity.valid(authorization):
            return error(401, "Http.Unauthorized", "the access token is missing or expired")
        if media.split(";")[0].strip().lower() != "application/json":
            # The real API also reads protobuf; the emulator reads JSON only.
            return error(415, "Http.UnsupportedMediaType", "send application/json")
        if not box_id:
            return error(400, "Http.BadRequest", "boxId is required")
        events = self._boxes.get(box_id)
        if events is None:
            return error(403, "Http.Forbidden", "no access to this box")
        if not isinstance(body, dict):
            return error(400, "Http.BadRequest", "the body must be a JSON object")
        try:
            query = Query.parse(body)
        except ValueError as exc:
            return error(400, "Http.BadRequest", str(exc))
        allowed = self.departments.get(box_id)
        if allowed is not None and query.department != allowed:
            return error(403, "Http.Forbidden", "no access to all documents of the organisation")
        page, total = query.select(events)
        populate = query.populate
        return Answer(
            200,
            {
                "TotalCount": total,
                "TotalCountType": 1,  # Equal
                "Events": [
                    e.as_json(populate=populate, version=version, box_id=box_id) for e in page
                ],
            },
        )
