"""The drain loop around one source: single-flight passes, coalesced wake-ups, back-off.

A source (the Bitrix24 offline queue, or later a polled feed) knows how to run one pass; this
module decides *when*: at start, on every authenticated notification, on every poll tick, and
again after a failed pass once its back-off has passed. Notifications that arrive during a pass
coalesce into at most one more pass, and a notification older than the portal time at which a
pass last found the queue empty costs nothing at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable

from bridge.core.errors import LeaseLost, PortalStopped, TokenError
from bridge.core.retry import backoff
from bridge.core.source import Source
from bridge.metrics import Metrics

log = logging.getLogger(__name__)


class Drainer:
    def __init__(
        self,
        source: Source,
        *,
        metrics: Metrics,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        min_gap: float = 0.0,
    ) -> None:
        self.source = source
        self._metrics = metrics
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._min_gap = min_gap
        self._last_start = -math.inf
        self._wake = asyncio.Event()
        self._untimed = True  # the first pass runs unconditionally
        self._full = True
        self._pending_ts: float | None = None
        self._covered = -math.inf
        self._closing = False
        self._closed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.failures = 0
        self._retry_after: float | None = None
        self.passes = 0
        self.skipped_notifications = 0
        self.stopped: str | None = None
        self._recheck_at: float | None = None  # monotonic; when a stopped portal is tried again
        self.on_stop: Callable[[str | None], None] | None = None  # stopped (reason) / resumed
        self.last_error: str | None = None
        self.in_pass = False
        self.released = False  # the source's shard went to another replica: the loop ended
        self.beat = time.monotonic()
        self.idle = asyncio.Event()  # set while no pass is due or running

    # -- triggers ----------------------------------------------------------------------

    def notify(self, ts: float | None = None) -> bool:
        """Wake for a notification sent at portal time ``ts``; False if already covered."""
        if ts is not None and ts < self._covered:
            self.skipped_notifications += 1
            return False
        if ts is None:
            if self._untimed:
                return True  # a pass is already due: nothing to wake
            self._untimed = True
        else:
            if self._pending_ts is not None and ts <= self._pending_ts:
                return True  # a replay of a notification already waiting for its pass
            self._pending_ts = ts
        self.idle.clear()
        self._wake.set()
        return True

    def tick(self) -> None:
        """A poll tick: a full pass including the search for orphaned reservations."""
        self._full = True
        self.notify(None)

    def resume(self) -> None:
        """Try a stopped source again now (a new token, a re-check that is due)."""
        if self.stopped is None:
            return
        self.stopped, self._recheck_at = None, None
        self._metrics.portal_stopped.labels(portal=self.source.name).set(0)
        if self.on_stop is not None:
            self.on_stop(None)
        log.info("portal drain resumed", extra={"portal": self.source.name})
        self._full = True
        self.notify(None)

    @property
    def progress_at(self) -> float:
        """The last sign of progress: a pass started or ended, an answer, a confirm."""
        reported = getattr(self.source, "progress_at", None)
        return max(self.beat, reported if isinstance(reported, float) else self.beat)

    def _next_timer(self) -> float | None:
        """Seconds until a pass is due by the clock (a re-check, a source's own wish)."""
        moments = []
        if self._recheck_at is not None:
            moments.append(self._recheck_at)
        due = getattr(self.source, "due_at", None)
        if isinstance(due, float) and self.stopped is None:
            moments.append(due)
        if not moments:
            return None
        return max(0.0, min(moments) - time.monotonic())

    # -- running -----------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"drain {self.source.name}")

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self, grace: float) -> None:
        """Let the pass in flight finish its page within ``grace`` seconds, then cancel it."""
        self._closing = True
        self.source.request_stop()
        self._closed.set()
        self._wake.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _due(self) -> bool:
        if self._untimed:
            return True
        return self._pending_ts is not None and self._pending_ts >= self._covered

    def _pacing_delay(self) -> float:
        """How long an *uncertain* wake-up must wait.

        ``ts`` has a resolution of one second: a notification sent in the same second as the
        last empty answer may or may not be covered by it. Such notifications still get a pass,
        but passes they start are spaced by ``min_gap`` (the portal's sustained request rate),
        so a replayed or flooded notification cannot cost more than that. A notification from
        a later second, a poll tick or the start always run at once.
        """
        if self._untimed or self._pending_ts is None or self._pending_ts >= self._covered + 1:
            return 0.0
        return self._last_start + self._min_gap - time.monotonic()

    async def _run(self) -> None:
        while not self._closing:
            self.beat = time.monotonic()
            if self._recheck_at is not None and time.monotonic() >= self._recheck_at:
                self.resume()
            if not self._due():
                self.idle.set()
                self._wake.clear()
                timer = self._next_timer()
                if timer is None:
                    await self._wake.wait()
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timer):
                        await self._wake.wait()
                if self._next_timer() == 0.0 and self.stopped is None:
                    self._untimed = True  # the source asked for a pass at this time
                continue
            if self.stopped is not None:
                self._untimed, self._pending_ts = False, None
                continue
            delay = self._pacing_delay()
            if delay > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                continue
            self._last_start = time.monotonic()
            self._untimed, self._pending_ts = False, None
            full, self._full = self._full, False
            ok = await self.run_once(full_check=full)
            if not ok and self.stopped is None and not self._closing:
                delay = backoff(self.failures, base=self._backoff_base, cap=self._backoff_cap)
                # OPERATION_TIME_LIMIT says when the budget comes back: not before that.
                delay = max(delay, self._backoff_base, self._retry_after or 0.0)
                log.info(
                    "drain retry scheduled",
                    extra={"portal": self.source.name, "delay_s": round(delay, 2)},
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._closed.wait()
                self._full = True
                self._untimed = True
        self.idle.set()

    async def run_once(self, *, full_check: bool) -> bool:
        """One pass; answers whether it ended with the queue empty and nothing failed."""
        name = self.source.name
        started = time.monotonic()
        self.in_pass = True
        self.passes += 1
        try:
            report = await self.source.run_pass(full_check=full_check)
        except (PortalStopped, TokenError) as exc:
            self.stopped = str(exc)
            self.last_error = str(exc)
            recheck = exc.recheck_after if isinstance(exc, PortalStopped) else None
            self._recheck_at = None if recheck is None else time.monotonic() + recheck
            self._metrics.drain_passes.labels(portal=name, outcome="stopped").inc()
            self._metrics.portal_stopped.labels(portal=name).set(1)
            if self.on_stop is not None:
                self.on_stop(self.stopped)
            log.error(
                "portal drain stopped: fix the configuration or reinstall the application",
                extra={
                    "portal": name,
                    "reason": str(exc),
                    "recheck_in_s": recheck,
                },
            )
            return False
        except LeaseLost as exc:
            # Another replica may drain this source now: stop quietly, write nothing more.
            self.released, self._closing = True, True
            self._metrics.drain_passes.labels(portal=name, outcome="fenced").inc()
            log.info("drain pass fenced off", extra={"portal": name, "reason": str(exc)})
            return False
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failures += 1
            self._retry_after = getattr(exc, "retry_after", None)
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._metrics.drain_passes.labels(portal=name, outcome="failed").inc()
            log.warning(
                "drain pass failed",
                extra={"portal": name, "reason": self.last_error, "failures": self.failures},
            )
            return False
        finally:
            self.in_pass = False
            self.beat = time.monotonic()
            self._metrics.drain_duration.labels(portal=name).observe(time.monotonic() - started)
        self.failures = 0
        self.last_error = None
        if report.covered_until is not None:
            self._covered = math.floor(report.covered_until)
        self._metrics.drain_passes.labels(portal=name, outcome="ok").inc()
        if report.published or report.cleared:
            log.info(
                "drain pass done",
                extra={"portal": name, "published": report.published, "cleared": report.cleared},
            )
        return True
