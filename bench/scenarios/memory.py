"""Memory: the bridge's peak RSS during a 50,000- and a 200,000-event drain.

Peak = the larger of the highest ``VmRSS`` sampled every 50 ms and ``VmHWM`` (the kernel's own
high-water mark) from ``/proc/<pid>/status``. The 50,000-event figure comes from the drain
scenario when it ran in the same invocation. Targets: ≤ 120 MB each, and the larger drain within
10% of the smaller (memory must not grow with the backlog).
"""

from __future__ import annotations

from bench.context import Context
from bench.drainrun import DrainRun, drain_backlog
from bench.report import Result

TITLE = "memory (peak RSS of the bridge)"
LIMIT_MB = 120.0


async def run(ctx: Context, result: Result) -> None:
    small_count, large_count = ctx.size(50_000, 5_000), ctx.size(200_000, 20_000)
    small: DrainRun | None = ctx.shared.get("drain")
    if small is None or small.count != small_count:
        small = await drain_backlog(
            ctx, small_count, label="memory-small", within=60 + small_count / 400
        )
    else:
        result.notes.append(f"{small_count:,}-event figure from the drain scenario")
    large = await drain_backlog(
        ctx, large_count, label="memory-large", within=60 + large_count / 800
    )
    growth = large.peak_rss_mb / small.peak_rss_mb if small.peak_rss_mb else None
    result.metrics.update(
        {
            f"peak_rss_mb_{small_count}": round(small.peak_rss_mb, 1),
            f"peak_rss_mb_{large_count}": round(large.peak_rss_mb, 1),
            "growth_ratio": None if growth is None else round(growth, 3),
            f"events_per_s_{large_count}": round(large.events_per_s, 1),
            f"complete_{large_count}": large.complete,
        }
    )
    result.notes.extend(large.notes)
    result.check(f"peak RSS, {small_count:,} events", small.peak_rss_mb, "<=", LIMIT_MB, "MB")
    result.check(f"peak RSS, {large_count:,} events", large.peak_rss_mb, "<=", LIMIT_MB, "MB")
    result.check("large / small drain", growth, "<=", 1.10)
