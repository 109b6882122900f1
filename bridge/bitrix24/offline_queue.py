"""The Bitrix24 offline queue as a drain source: reserve → journal → publish → confirm → clear.

Nothing is cleared that the broker did not confirm: ``event.offline.clear`` is called only with
a :class:`~bridge.bitrix24.pages.ConfirmedPage`, built from what the publisher reported
confirmed (or what the journal recorded as confirmed before a failure). Confirmed events are
recorded in the journal before they are cleared, so a retry after a failed clear clears them
without publishing them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bridge.amqp.protocol import OutgoingMessage, Publisher
from bridge.bitrix24.messages import MalformedEvent, Routing, to_message
from bridge.bitrix24.orphans import LIST, OrphanScan
from bridge.bitrix24.pacing import MAX_COMMANDS
from bridge.bitrix24.pages import ConfirmedPage, Reservation
from bridge.bitrix24.poison import PoisonGuard, Refused
from bridge.bitrix24.upstream import PortalClient
from bridge.core.errors import NotConfirmed, StateError, UpstreamError
from bridge.core.source import PassReport
from bridge.metrics import Metrics
from bridge.state import JournalEntry
from bridge.state.open import StateStore

log = logging.getLogger(__name__)

GET = "event.offline.get"
CLEAR = "event.offline.clear"
LOOKAHEAD = 2  # reserved batches waiting ahead of publishing
MAX_RESERVATIONS = 25  # per batch, leaving room for as many clears
OLD_EVENT = 30 * 86400.0  # the portal deletes reserved rows of events ~34 days old

# Answers that prove the reservation never ran, so it cannot have left an orphan behind.
REFUSED_BEFORE_RUNNING = frozenset(
    {"QUERY_LIMIT_EXCEEDED", "OPERATION_TIME_LIMIT", "expired_token", "invalid_token"}
)


class MalformedAnswer(UpstreamError):
    def __init__(self, description: str) -> None:
        super().__init__("MALFORMED_ANSWER", description, method=GET)


@dataclass(frozen=True, slots=True)
class _Failed:
    error: Exception


@dataclass(slots=True)
class _Outcome:
    """What became of one reserved page in a publish run."""

    clear: ConfirmedPage | None
    complete: bool  # every row confirmed, or parked


class OfflineQueue:
    """One portal's (and connector's) offline queue, drained one pass at a time."""

    def __init__(
        self,
        client: PortalClient,
        *,
        state: StateStore,
        publisher: Publisher,
        routing: Routing,
        metrics: Metrics,
        page_size: int,
        poison_attempts: int = 5,
        abandon_grace: float = 75.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self._state = state
        self._publisher = publisher
        self.routing = routing
        self._metrics = metrics
        self._page_size = page_size
        self.connector = routing.connector
        self.stopping = False
        self.replay_requested = False
        self._clock = clock
        self._published_at = clock()
        self._heartbeat = clock()
        self.orphans = OrphanScan(client, connector=self.connector, grace=abandon_grace)
        self._poison = PoisonGuard(
            client, state=state, metrics=metrics, connector=self.connector, attempts=poison_attempts
        )
        self._abandoned: set[str] = set()  # reservations of rows only the state file can keep

    def request_stop(self) -> None:
        """Finish the page in flight (publish, confirm, clear), then reserve nothing more."""
        self.stopping = True

    @property
    def name(self) -> str:
        return self.client.portal.domain

    @property
    def member_id(self) -> str:
        return self.client.portal.member_id

    @property
    def progress_at(self) -> float:
        """When the portal last answered or the broker last confirmed (for liveness)."""
        return max(self._published_at, self._heartbeat, self.client.last_answer)

    @property
    def due_at(self) -> float | None:
        return self.orphans.due_at

    def _params(self, **params: Any) -> dict[str, Any]:
        if self.connector:
            params["auth_connector"] = self.connector
        return params

    # -- the pass ----------------------------------------------------------------------

    async def run_pass(self, *, full_check: bool) -> PassReport:
        report = PassReport()
        await self._recover_journal(report)
        if full_check or self.orphans.suspected:
            await self._recover_orphans(report)
        if self.replay_requested and not self.stopping:
            self.replay_requested = False
            await self.replay(report)
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
                await self._publish_run(run, to_clear, report)
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
        pacer = self.client.pacer
        while True:
            gets = pacer.plan(GET, 0, MAX_RESERVATIONS)
            clear_room = self._clear_room(len(to_clear), MAX_COMMANDS - gets)
            if gets >= 1:
                break
            if clear_room and pacer.budget("batch").room() >= 1:
                await self._clear_batch(to_clear, clear_room, report)
                continue
            # Nothing is taken from `to_clear` while waiting: a cancellation loses nothing.
            # Waiting for the portal's budget is the plan, not a stall: liveness hears of it.
            self._heartbeat = self._clock()
            await asyncio.sleep(min(pacer.wait_time(GET) + 0.01, 30.0))
        clears = to_clear[:clear_room]
        del to_clear[:clear_room]
        commands: dict[str, tuple[str, Mapping[str, Any]]] = {
            f"c{index}": (CLEAR, page.clear_params()) for index, page in enumerate(clears)
        }
        get_params = {"clear": 0, "limit": self._page_size}
        for index in range(gets):
            commands[f"g{index}"] = (GET, get_params)
        try:
            answer = await self.client.batch(commands, idempotent=False, connector=self.connector)
        except BaseException:
            # Cancelled or unanswered: reservations may exist that we never heard of, and the
            # request may still run on the portal for a while.
            self.orphans.abandoned()
            to_clear[:0] = clears
            raise

        reservations: list[Reservation] = []
        error: Exception | None = None
        exhausted = False
        for index in range(gets):
            key = f"g{index}"
            failure = answer.errors.get(key)
            if failure is not None:
                if failure.code not in REFUSED_BEFORE_RUNNING:
                    # A server fault may strike after the rows were stamped: look for them.
                    self.orphans.suspect()
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
            self._warn_old(reservations, answer.time)
        self._metrics.events_per_request.observe(sum(len(r.rows) for r in reservations))
        await self._settle_clears(clears, answer.errors, report)
        if exhausted and error is None:
            start = answer.time.get("start")
            if isinstance(start, int | float):
                report.covered_until = float(start)
        return reservations, exhausted, error

    def _clear_room(self, waiting: int, commands: int) -> int:
        """Clears for the next batch, beside reservations that leave ``commands`` free."""
        if not waiting:
            return 0
        room = min(self.client.pacer.plan(CLEAR, 0, waiting), commands)
        return max(room, 1)  # never starve clears: they are what frees the portal's queue

    async def _clear_batch(
        self, to_clear: list[ConfirmedPage], count: int, report: PassReport
    ) -> None:
        chunk = to_clear[:count]
        del to_clear[:count]
        commands = {f"c{i}": (CLEAR, page.clear_params()) for i, page in enumerate(chunk)}
        try:
            answer = await self.client.batch(commands, idempotent=True, connector=self.connector)
        except BaseException:
            to_clear[:0] = chunk
            raise
        await self._settle_clears(chunk, answer.errors, report)

    async def _flush(self, to_clear: list[ConfirmedPage], report: PassReport) -> None:
        while to_clear:
            await self._clear_batch(to_clear, min(len(to_clear), MAX_COMMANDS), report)

    async def _settle_clears(
        self, pages: list[ConfirmedPage], errors: Mapping[str, UpstreamError], report: PassReport
    ) -> None:
        """Book the clears sent as ``c0``, ``c1``, ... of a batch; retry failed ones alone."""
        await self._cleared([p for i, p in enumerate(pages) if f"c{i}" not in errors], report)
        for index, page in enumerate(pages):
            if f"c{index}" in errors:
                await self._clear(page, report)  # clearing is idempotent

    async def _publish_run(
        self, reservations: list[Reservation], to_clear: list[ConfirmedPage], report: PassReport
    ) -> None:
        """Publish several reserved pages in one pipelined run, in order."""
        outcomes = await self._publish(reservations, report)
        to_clear.extend(o.clear for o in outcomes if o.clear is not None)
        left = sum(1 for o in outcomes if not o.complete)
        if left:
            raise NotConfirmed(f"{left} of {len(outcomes)} pages not wholly confirmed")

    # -- steps -------------------------------------------------------------------------

    def _reservation(self, result: object, *, replay: bool = False) -> Reservation:
        if not isinstance(result, dict):
            self.orphans.suspect()
            raise MalformedAnswer("the reservation answer is not an object")
        process_id = result.get("process_id")
        rows = result.get("events")
        if not isinstance(rows, list):
            self.orphans.suspect()
            raise MalformedAnswer("the reservation answer has no event list")
        if not rows:
            return Reservation(process_id="", rows=())
        if not isinstance(process_id, str) or not process_id:
            self.orphans.suspect()
            raise MalformedAnswer("the reservation answer has events but no process_id")
        return Reservation(process_id=process_id, rows=tuple(rows), replay=replay)

    async def _publish(
        self,
        reservations: Sequence[Reservation],
        report: PassReport,
        *,
        known: Mapping[str, frozenset[str]] | None = None,
        read_all: bool = True,
    ) -> list[_Outcome]:
        """Publish the rows of several pages; record, park and clear-plan the outcome per page.

        ``known``: per process id, MESSAGE_IDs the journal says were confirmed already; those
        rows are cleared without being published again.
        """
        pages: list[list[OutgoingMessage]] = [[] for _ in reservations]
        malformed: list[list[Refused]] = [[] for _ in reservations]
        already: list[list[Mapping[str, Any]]] = [[] for _ in reservations]
        for index, reservation in enumerate(reservations):
            done_before = (known or {}).get(reservation.process_id, frozenset())
            for row in reservation.rows:
                if isinstance(row, Mapping) and row.get("MESSAGE_ID") in done_before:
                    already[index].append(row)
                    continue
                try:
                    pages[index].append(to_message(row, self.routing))
                except MalformedEvent as exc:
                    safe_row = row if isinstance(row, Mapping) else {"row": repr(row)[:1000]}
                    malformed[index].append(Refused(safe_row, "malformed"))
                    log.error(
                        "malformed event",
                        extra={
                            "portal": self.name,
                            "process_id": reservation.process_id,
                            "reason": str(exc),
                        },
                    )
        results = await self._publisher.publish_pages(pages)
        self._published_at = self._clock()
        confirmed = [m for result in results for m in result.confirmed]
        for name, count in Counter(m.type for m in confirmed).items():
            self._metrics.events_published.labels(event=name).inc(count)
        report.published += len(confirmed)
        sent = sum(len(page) for page in pages)
        if sent:
            log.info(
                "pages published",
                extra={
                    "portal": self.name,
                    "process_ids": [r.process_id for r in reservations],
                    "events": sent,
                    "confirmed": len(confirmed),
                    "failed": sent - len(confirmed),
                },
            )
        # Remembered before anything is cleared: a failed clear then costs no second copy.
        await self._state.journal_confirm(
            self.member_id,
            self.connector,
            {
                r.process_id: result.proof
                for r, result in zip(reservations, results, strict=True)
                if result.proof is not None
            },
        )
        outcomes: list[_Outcome] = []
        for index, (reservation, result) in enumerate(zip(reservations, results, strict=True)):
            refused = malformed[index] + [
                Refused(_row_of(reservation, m), reason) for m, reason in result.failed
            ]
            due = self._poison.count(reservation.process_id, refused)
            parked = await self._poison.park(reservation.process_id, due) if due else []
            report.parked += len(due)
            complete = len(due) == len(refused)
            if complete and read_all:
                self._poison.forget(reservation.process_id)
            unparkable = [i for i in due if str(i.row.get("MESSAGE_ID")) not in parked]
            if unparkable and complete:
                self._abandoned.add(reservation.process_id)
            done = complete and read_all
            page = ConfirmedPage.of(reservation.process_id, result.proof, already[index], done=done)
            outcomes.append(_Outcome(page, complete))
            if page is None and done:
                await self._drop(reservation.process_id)
        return outcomes

    def _warn_old(self, reservations: Sequence[Reservation], time_block: Mapping[str, Any]) -> None:
        now = time_block.get("start")
        reference = float(now) if isinstance(now, int | float) else time.time()
        for reservation in reservations:
            old = sum(1 for row in reservation.rows if _age(row, reference) > OLD_EVENT)
            if old:
                log.warning(
                    "reserved events older than 30 days: the portal deletes reservations of "
                    "events about 34 days old, so drain this backlog soon",
                    extra={
                        "portal": self.name,
                        "process_id": reservation.process_id,
                        "events": old,
                    },
                )

    async def _clear(self, page: ConfirmedPage, report: PassReport) -> None:
        await self.client.call(CLEAR, self._params(**page.clear_params()), idempotent=True)
        await self._cleared([page], report)

    async def _cleared(self, pages: list[ConfirmedPage], report: PassReport) -> None:
        names: Counter[str] = Counter()
        for page in pages:
            names.update(page.event_names)
            report.cleared += len(page.message_ids)
        for name, count in names.items():
            self._metrics.events_cleared.labels(event=name).inc(count)
        done = [page.process_id for page in pages if page.done]
        if done:
            await self._state.journal_remove(self.member_id, self.connector, done)
            self._metrics.inflight.labels(portal=self.name).dec(len(done))
            for process_id in done:
                self._poison.forget(process_id)

    async def _drop(self, process_id: str) -> None:
        await self._state.journal_remove(self.member_id, self.connector, [process_id])
        self._metrics.inflight.labels(portal=self.name).dec()
        self._poison.forget(process_id)

    # -- recovery ----------------------------------------------------------------------

    async def _recover_journal(self, report: PassReport) -> None:
        journal = await self._state.journal_entries(self.member_id, self.connector)
        self._metrics.inflight.labels(portal=self.name).set(len(journal))
        for entry in journal:
            if self.stopping:
                return
            await self.recover(entry, report)

    async def recover(self, entry: JournalEntry, report: PassReport) -> None:
        """Re-read a reservation until nothing is left under it; publish and clear what is."""
        limit = max(self._page_size, 50)
        known = entry.confirmed
        while True:
            params = self._params(process_id=entry.process_id, clear=0, limit=limit)
            if entry.replay:
                params["error"] = 1
            answer = await self.client.call(GET, params, idempotent=True)
            reservation = self._reservation(answer.result, replay=entry.replay)
            if not reservation.rows:
                await self._drop(entry.process_id)
                return
            reservation = Reservation(entry.process_id, reservation.rows, entry.replay)
            read_all = len(reservation.rows) < limit
            (outcome,) = await self._publish(
                [reservation], report, known={entry.process_id: known}, read_all=read_all
            )
            log.info(
                "reservation recovered",
                extra={
                    "portal": self.name,
                    "process_id": entry.process_id,
                    "events": len(reservation.rows),
                },
            )
            if outcome.clear is not None:
                await self._clear(outcome.clear, report)
            if not outcome.complete:
                raise NotConfirmed(f"recovery of {entry.process_id}: not every event confirmed")
            if read_all:
                return
            known = frozenset()  # what was confirmed is cleared now

    async def _recover_orphans(self, report: PassReport) -> None:
        journal = await self._state.journal(self.member_id, self.connector)
        found = await self.orphans.step(set(journal) | self._abandoned)
        if not found:
            return
        log.warning("orphaned reservations found", extra={"portal": self.name, "count": len(found)})
        await self._state.journal_add(self.member_id, self.connector, found)
        self._metrics.inflight.labels(portal=self.name).inc(len(found))
        for process_id in found:
            await self.recover(JournalEntry(process_id, False, frozenset()), report)

    async def replay(self, report: PassReport) -> None:
        """Reserve parked rows again (``error=1``) and drain them like any other page."""
        while not self.stopping:
            params = self._params(clear=0, limit=self._page_size, error=1)
            try:
                answer = await self.client.call(GET, params, idempotent=False)
            except BaseException:
                self.orphans.abandoned()
                raise
            reservation = self._reservation(answer.result, replay=True)
            if not reservation.rows:
                return
            await self._state.journal_add(
                self.member_id, self.connector, [reservation.process_id], replay=True
            )
            self._metrics.inflight.labels(portal=self.name).inc()
            log.info(
                "parked events replayed",
                extra={"portal": self.name, "events": len(reservation.rows)},
            )
            await self.recover(JournalEntry(reservation.process_id, True, frozenset()), report)

    # -- observation -------------------------------------------------------------------

    async def observe(self) -> tuple[int, float | None] | None:
        """Queue depth and the oldest waiting event's time (for metrics); None when the
        ``event.offline.list`` budget has no room now."""
        if self.client.pacer.budget(LIST).room() < 1:
            return None
        answer = await self.client.call(
            LIST, self._params(order={"TIMESTAMP_X": "ASC"}), idempotent=True
        )
        rows = answer.result if isinstance(answer.result, list) else []
        depth = answer.total if answer.total is not None else len(rows)
        oldest: float | None = None
        if rows and isinstance(rows[0], dict):
            oldest = _stamp(rows[0])
        self._metrics.queue_depth.labels(portal=self.name).set(depth)
        age: float | None = None
        if oldest is not None:
            now = answer.time.get("start")
            reference = float(now) if isinstance(now, int | float) else time.time()
            age = max(0.0, reference - oldest)
            # The portal's clock measured the age; this process's clock anchors it, so a skew
            # between the two does not shift the alert.
            self._metrics.oldest_timestamp.labels(portal=self.name).set(time.time() - age)
        elif depth == 0:
            with contextlib.suppress(KeyError):  # already absent
                self._metrics.oldest_timestamp.remove(self.name)
        return depth, age


def _row_of(reservation: Reservation, message: OutgoingMessage) -> Mapping[str, Any]:
    for row in reservation.rows:
        if isinstance(row, Mapping) and row.get("MESSAGE_ID") == message.key:
            return row
    return {"MESSAGE_ID": message.key, "EVENT_NAME": message.type}


def _stamp(row: Mapping[str, Any]) -> float | None:
    try:
        return datetime.fromisoformat(str(row.get("TIMESTAMP_X"))).timestamp()
    except ValueError:
        return None


def _age(row: object, reference: float) -> float:
    if not isinstance(row, Mapping):
        return 0.0
    stamp = _stamp(row)
    return 0.0 if stamp is None else reference - stamp
