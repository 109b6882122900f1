"""The Bitrix24 offline queue as a drain source: reserve → journal → publish → confirm → clear.

Nothing is cleared that the broker did not confirm: :meth:`OfflineQueue._clear` accepts only a
:class:`ConfirmedPage`, and a ``ConfirmedPage`` is made only from a :class:`PublishResult`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bridge.errors import StateError, UpstreamError
from bridge.messages import MalformedEvent, Routing, to_message
from bridge.metrics import Metrics
from bridge.pacing import MAX_COMMANDS, Pacer
from bridge.publisher import OutgoingMessage, Publisher, PublishResult
from bridge.state import State
from bridge.upstream import PortalClient

log = logging.getLogger(__name__)

GET = "event.offline.get"
CLEAR = "event.offline.clear"
LIST = "event.offline.list"
LOOKAHEAD = 2  # reserved batches waiting ahead of publishing
MAX_RESERVATIONS = 25  # per batch, leaving room for as many clears
MAX_ORPHAN_SCAN = 10_000  # reserved rows looked at per scan (reservations are few and small)


# Answers that prove the reservation never ran, so it cannot have left an orphan behind.
REFUSED_BEFORE_RUNNING = frozenset(
    {"QUERY_LIMIT_EXCEEDED", "OPERATION_TIME_LIMIT", "expired_token", "invalid_token"}
)


class NotConfirmed(Exception):
    """Some events of a page were not confirmed; they stay reserved for the next pass."""


class MalformedAnswer(UpstreamError):
    def __init__(self, description: str) -> None:
        super().__init__("MALFORMED_ANSWER", description, method=GET)


@dataclass(frozen=True, slots=True)
class Reservation:
    process_id: str
    rows: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True, slots=True)
class ConfirmedPage:
    """The part of a reservation RabbitMQ confirmed; the only thing that may be cleared."""

    process_id: str
    message_ids: tuple[str, ...]
    event_names: tuple[str, ...]
    whole: bool

    @classmethod
    def of(
        cls, reservation: Reservation, result: PublishResult, *, read_all: bool
    ) -> ConfirmedPage:
        return cls(
            process_id=reservation.process_id,
            message_ids=tuple(m.key for m in result.confirmed),
            event_names=tuple(m.type for m in result.confirmed),
            # Clearing the whole process is allowed only when every row under it was read and
            # confirmed; otherwise name the confirmed rows one by one.
            whole=result.complete and read_all,
        )

    def clear_params(self, connector: str) -> dict[str, Any]:
        params: dict[str, Any] = {"process_id": self.process_id}
        if connector:
            params["auth_connector"] = connector
        if not self.whole:
            # Never an empty list: Bitrix24 treats it as "clear the whole process".
            assert self.message_ids
            params["message_id"] = list(self.message_ids)
        return params


@dataclass(frozen=True, slots=True)
class _Failed:
    error: Exception


def _split(
    result: PublishResult, reservations: list[Reservation], messages: list[OutgoingMessage]
) -> list[PublishResult]:
    """One publisher result per page, so each page is confirmed (and cleared) on its own."""
    owner: dict[int, int] = {}
    failed_by_page: list[list[tuple[OutgoingMessage, str]]] = [[] for _ in reservations]
    confirmed_by_page: list[list[OutgoingMessage]] = [[] for _ in reservations]
    sizes = [len(r.rows) for r in reservations]
    index = 0
    for page, size in enumerate(sizes):
        for _ in range(size):
            owner[index] = page
            index += 1
    positions = {id(m): i for i, m in enumerate(messages)}
    for message in result.confirmed:
        confirmed_by_page[owner[positions[id(message)]]].append(message)
    for message, reason in result.failed:
        failed_by_page[owner[positions[id(message)]]].append((message, reason))
    return [
        PublishResult(confirmed=tuple(c), failed=tuple(f))
        for c, f in zip(confirmed_by_page, failed_by_page, strict=True)
    ]


@dataclass(slots=True)
class PassReport:
    published: int = 0
    cleared: int = 0
    covered_until: float | None = None


class OfflineQueue:
    """One portal's (and connector's) offline queue, drained one pass at a time."""

    def __init__(
        self,
        client: PortalClient,
        *,
        state: State,
        publisher: Publisher,
        routing: Routing,
        metrics: Metrics,
        page_size: int,
    ) -> None:
        self.client = client
        self._state = state
        self._publisher = publisher
        self.routing = routing
        self._metrics = metrics
        self._page_size = page_size
        self.connector = routing.connector
        self.orphans_suspected = True  # unknown until the first scan at startup
        self.stopping = False
        self._pacer = Pacer()

    def request_stop(self) -> None:
        """Finish the page in flight (publish, confirm, clear), then reserve nothing more."""
        self.stopping = True

    @property
    def name(self) -> str:
        return self.client.portal.domain

    @property
    def member_id(self) -> str:
        return self.client.portal.member_id

    def _params(self, **params: Any) -> dict[str, Any]:
        if self.connector:
            params["auth_connector"] = self.connector
        return params

    # -- the pass ----------------------------------------------------------------------

    async def run_pass(self, *, full_check: bool) -> PassReport:
        report = PassReport()
        await self._recover_journal(report)
        if full_check or self.orphans_suspected:
            await self._recover_orphans(report)
        # Reserving runs ahead of publishing (up to LOOKAHEAD batches); confirmed pages wait
        # in `to_clear` and ride along with the next reservation request.
        to_clear: list[ConfirmedPage] = []
        pages: asyncio.Queue[list[Reservation] | _Failed | None] = asyncio.Queue(LOOKAHEAD)
        reserver = asyncio.create_task(self._reserve_loop(pages, to_clear, report))
        try:
            item = await pages.get()
            while item is not None:
                if isinstance(item, _Failed):
                    raise item.error
                run = list(item)
                # Pages reserved meanwhile go in the same pipelined publish.
                marker: _Failed | None = None
                ended = False  # the end marker (or a failure) was taken from the queue
                while not pages.empty() and not ended:
                    following = pages.get_nowait()
                    if isinstance(following, list):
                        run.extend(following)
                    else:
                        marker, ended = following, True
                await self._publish_pages(run, to_clear, report)
                item = marker if ended else await pages.get()
            await reserver
        except Exception:
            reserver.cancel()
            await asyncio.gather(reserver, return_exceptions=True)
            # What was confirmed is still worth clearing: it saves duplicates after recovery.
            with contextlib.suppress(UpstreamError, StateError):
                await self._flush(to_clear, report)
            raise
        except BaseException:
            reserver.cancel()
            raise
        await self._flush(to_clear, report)
        return report

    async def _reserve_loop(
        self,
        pages: asyncio.Queue[list[Reservation] | _Failed | None],
        to_clear: list[ConfirmedPage],
        report: PassReport,
    ) -> None:
        try:
            while not self.stopping:
                reservations, exhausted, error = await self._reserve_batch(to_clear, report)
                if reservations:
                    await pages.put(reservations)
                if error is not None:
                    raise error
                if exhausted:
                    break
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await pages.put(_Failed(exc))
            return
        await pages.put(None)

    async def _reserve_batch(
        self, to_clear: list[ConfirmedPage], report: PassReport
    ) -> tuple[list[Reservation], bool, Exception | None]:
        """One request: clear confirmed pages and reserve as many pages as the budget allows."""
        clears = self._take_clears(to_clear)
        gets = self._pacer.plan(GET, len(clears), MAX_RESERVATIONS)
        while gets < 1:
            await asyncio.sleep(self._pacer.budget(GET).wait_time() + 0.01)
            gets = self._pacer.plan(GET, len(clears), MAX_RESERVATIONS)
        commands: dict[str, tuple[str, Mapping[str, Any]]] = {}
        for index, page in enumerate(clears):
            commands[f"c{index}"] = (CLEAR, page.clear_params(self.connector))
        get_params = self._params(clear=0, limit=self._page_size)
        for index in range(gets):
            commands[f"g{index}"] = (GET, get_params)
        self._pacer.budget(GET).spend(gets)
        self._pacer.budget(CLEAR).spend(len(clears))
        try:
            answer = await self.client.batch(commands, idempotent=False)
        except BaseException:
            # Cancelled or unanswered: reservations may exist that we never heard of.
            self.orphans_suspected = True
            to_clear[:0] = clears
            raise
        self._pacer.observe({k: m for k, (m, _p) in commands.items()}, answer.command_times)

        reservations: list[Reservation] = []
        error: Exception | None = None
        exhausted = False
        for index in range(gets):
            key = f"g{index}"
            failure = answer.errors.get(key)
            if failure is not None:
                if failure.code not in REFUSED_BEFORE_RUNNING:
                    # A server fault may strike after the rows were stamped: look for them.
                    self.orphans_suspected = True
                error = error or failure
                continue
            try:
                reservation = self._reservation(answer.results.get(key))
            except MalformedAnswer as exc:
                error = error or exc
                continue
            if reservation.rows:
                reservations.append(reservation)
            else:
                exhausted = True
        if reservations:
            # Journaled before anything else can fail, so a crash from here on finds them.
            await self._state.journal_add(
                self.member_id, self.connector, [r.process_id for r in reservations]
            )
            self._metrics.inflight.labels(portal=self.name).inc(len(reservations))
        self._metrics.events_per_request.observe(sum(len(r.rows) for r in reservations))
        await self._settle_clears(clears, answer.errors, report)
        if exhausted and error is None:
            start = answer.time.get("start")
            if isinstance(start, int | float):
                report.covered_until = float(start)
        return reservations, exhausted, error

    def _take_clears(self, to_clear: list[ConfirmedPage]) -> list[ConfirmedPage]:
        room = self._pacer.plan(CLEAR, 1, len(to_clear))
        if room < 1 and to_clear:
            room = 1  # never starve clears: they are what frees the portal's queue
        taken = to_clear[:room]
        del to_clear[:room]
        return taken

    async def _flush(self, to_clear: list[ConfirmedPage], report: PassReport) -> None:
        while to_clear:
            chunk = to_clear[:MAX_COMMANDS]
            commands = {
                f"c{i}": (CLEAR, page.clear_params(self.connector)) for i, page in enumerate(chunk)
            }
            answer = await self.client.batch(commands, idempotent=True)
            await self._settle_clears(chunk, answer.errors, report)
            del to_clear[: len(chunk)]

    async def _settle_clears(
        self, pages: list[ConfirmedPage], errors: Mapping[str, UpstreamError], report: PassReport
    ) -> None:
        """Book the clears sent as ``c0``, ``c1``, ... of a batch; retry failed ones alone."""
        await self._cleared([p for i, p in enumerate(pages) if f"c{i}" not in errors], report)
        for index, page in enumerate(pages):
            if f"c{index}" in errors:
                await self._clear(page, report)  # clearing is idempotent

    async def _publish_pages(
        self, reservations: list[Reservation], to_clear: list[ConfirmedPage], report: PassReport
    ) -> None:
        """Publish several reserved pages in one pipelined run, in order."""
        pages = await self._publish(reservations, report, read_all=True)
        to_clear.extend(page for page in pages if page.whole)
        partial = [page for page in pages if not page.whole]
        if partial:
            for page in partial:
                if page.message_ids:
                    await self._clear(page, report)
            raise NotConfirmed(f"{len(partial)} of {len(pages)} pages not wholly confirmed")

    # -- steps -------------------------------------------------------------------------

    def _reservation(self, result: object) -> Reservation:
        if not isinstance(result, dict):
            self.orphans_suspected = True
            raise MalformedAnswer("the reservation answer is not an object")
        process_id = result.get("process_id")
        rows = result.get("events")
        if not isinstance(rows, list):
            self.orphans_suspected = True
            raise MalformedAnswer("the reservation answer has no event list")
        if not rows:
            return Reservation(process_id="", rows=())
        if not isinstance(process_id, str) or not process_id:
            self.orphans_suspected = True
            raise MalformedAnswer("the reservation answer has events but no process_id")
        return Reservation(process_id=process_id, rows=tuple(rows))

    async def _publish(
        self, reservations: list[Reservation], report: PassReport, *, read_all: bool
    ) -> list[ConfirmedPage]:
        messages: list[OutgoingMessage] = []
        for reservation in reservations:
            try:
                messages.extend(to_message(row, self.routing) for row in reservation.rows)
            except MalformedEvent as exc:
                log.error(
                    "page left reserved: malformed event",
                    extra={
                        "portal": self.name,
                        "process_id": reservation.process_id,
                        "reason": str(exc),
                    },
                )
                raise
        result = await self._publisher.publish(messages)
        for name, count in Counter(m.type for m in result.confirmed).items():
            self._metrics.events_published.labels(event=name).inc(count)
        report.published += len(result.confirmed)
        log.info(
            "pages published",
            extra={
                "portal": self.name,
                "process_ids": [r.process_id for r in reservations],
                "events": len(messages),
                "confirmed": len(result.confirmed),
                "failed": len(result.failed),
            },
        )
        parts = _split(result, reservations, messages) if len(reservations) > 1 else [result]
        return [
            ConfirmedPage.of(reservation, part, read_all=read_all)
            for reservation, part in zip(reservations, parts, strict=True)
        ]

    async def _clear(self, page: ConfirmedPage, report: PassReport) -> None:
        await self.client.call(CLEAR, page.clear_params(self.connector), idempotent=True)
        await self._cleared([page], report)

    async def _cleared(self, pages: list[ConfirmedPage], report: PassReport) -> None:
        names: Counter[str] = Counter()
        for page in pages:
            names.update(page.event_names)
            report.cleared += len(page.message_ids)
        for name, count in names.items():
            self._metrics.events_cleared.labels(event=name).inc(count)
        done = [page.process_id for page in pages if page.whole]
        if done:
            await self._state.journal_remove(self.member_id, self.connector, done)
            self._metrics.inflight.labels(portal=self.name).dec(len(done))

    # -- recovery ----------------------------------------------------------------------

    async def _recover_journal(self, report: PassReport) -> None:
        journal = await self._state.journal(self.member_id, self.connector)
        self._metrics.inflight.labels(portal=self.name).set(len(journal))
        for process_id in journal:
            if self.stopping:
                return
            await self.recover(process_id, report)

    async def recover(self, process_id: str, report: PassReport) -> None:
        """Re-read a reservation until nothing is left under it; publish and clear what is."""
        limit = max(self._page_size, 50)
        while True:
            answer = await self.client.call(
                GET, self._params(process_id=process_id, clear=0, limit=limit), idempotent=True
            )
            reservation = self._reservation(answer.result)
            if not reservation.rows:
                await self._state.journal_remove(self.member_id, self.connector, [process_id])
                self._metrics.inflight.labels(portal=self.name).dec()
                return
            reservation = Reservation(process_id=process_id, rows=reservation.rows)
            (page,) = await self._publish(
                [reservation], report, read_all=len(reservation.rows) < limit
            )
            log.info(
                "reservation recovered",
                extra={
                    "portal": self.name,
                    "process_id": process_id,
                    "events": len(reservation.rows),
                },
            )
            if page.message_ids:
                await self._clear(page, report)
            if len(page.message_ids) < len(reservation.rows):
                raise NotConfirmed(f"recovery of {process_id}: not every event was confirmed")
            if page.whole:
                return

    async def _recover_orphans(self, report: PassReport) -> None:
        """Find reservations whose answer was lost (not in the journal) and recover them."""
        known = set(await self._state.journal(self.member_id, self.connector))
        orphans: list[str] = []
        start = 0
        while True:
            answer = await self.client.call(
                LIST,
                self._params(filter={">PROCESS_ID": ""}, order={"ID": "ASC"}, start=start),
                idempotent=True,
            )
            rows = answer.result if isinstance(answer.result, list) else []
            for row in rows:
                pid = row.get("PROCESS_ID") if isinstance(row, dict) else None
                if isinstance(pid, str) and pid and pid not in known and pid not in orphans:
                    orphans.append(pid)
            if answer.next is None or not rows or answer.next <= start:
                break  # the last page, or a portal whose paging does not advance
            if start >= MAX_ORPHAN_SCAN:
                log.warning("orphan scan stopped early", extra={"portal": self.name, "rows": start})
                break
            start = answer.next
        self.orphans_suspected = False
        if not orphans:
            return
        log.warning(
            "orphaned reservations found", extra={"portal": self.name, "count": len(orphans)}
        )
        await self._state.journal_add(self.member_id, self.connector, orphans)
        for process_id in orphans:
            self._metrics.inflight.labels(portal=self.name).inc()
            await self.recover(process_id, report)

    async def observe(self) -> tuple[int, float | None]:
        """Queue depth and the age in seconds of the oldest waiting event (for metrics)."""
        answer = await self.client.call(
            LIST, self._params(order={"TIMESTAMP_X": "ASC"}), idempotent=True
        )
        rows = answer.result if isinstance(answer.result, list) else []
        depth = answer.total if answer.total is not None else len(rows)
        age: float | None = None
        if rows and isinstance(rows[0], dict):
            from datetime import datetime

            try:
                stamp = datetime.fromisoformat(str(rows[0].get("TIMESTAMP_X")))
                now = answer.time.get("start")
                ref = float(now) if isinstance(now, int | float) else stamp.timestamp()
                age = max(0.0, ref - stamp.timestamp())
            except ValueError:
                age = None
        self._metrics.queue_depth.labels(portal=self.name).set(depth)
        if age is not None:
            self._metrics.oldest_age.labels(portal=self.name).set(age)
        return depth, age
