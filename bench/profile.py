"""Where the bridge's time goes: the drain-throughput scenario with the bridge under py-spy.

``python -m bench.profile [--events N] [--rate HZ] [--top K] [--out DIR]`` drains an
N-event backlog (50,000 by default) from an unthrottled emulator with the bridge running under
``py-spy record`` (sampling, on-CPU only, every thread), then prints the functions with the most
cumulative (inclusive) and self time, and the self time per package. The raw collapsed stacks
(``profile.raw.txt``, for flamegraph.pl or speedscope) and the summary stay in ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from bench.broker import Broker
from bench.context import Context
from bench.drainrun import drain_backlog

_FRAME = re.compile(r"^(?P<name>.*) \((?P<path>.*?)(?::\d+)?\)$")
_SHORTEN = ("/site-packages/", "/lib/python3.", "/work/main/")


def _where(path: str) -> str:
    for marker in _SHORTEN:
        if marker in path:
            tail = path.split(marker, 1)[1]
            return tail.split("/", 1)[1] if marker == "/lib/python3." else tail
    return path


def _frame(raw: str) -> tuple[str, str]:
    """(function label, package) of one py-spy frame ``name (path:line)``."""
    match = _FRAME.match(raw.strip())
    if match is None:
        return raw.strip(), "?"
    where = _where(match["path"])
    package = where.split("/", 1)[0].removesuffix(".py") if "/" in where else "stdlib"
    if where.startswith("<") or "/" not in where:
        package = "stdlib"
    return f"{match['name']} ({where})", package


# Frames every stack of the event loop passes through: true, and useless in a top list.
_PLUMBING = re.compile(
    r"\((<frozen runpy>|asyncio/runners\.py|bridge/__main__\.py|threading\.py)\)$"
    r"|^(main|_run|_serve) \(bridge/cli\.py\)$"
    r"|^BaseEventLoop\.(run_forever|run_until_complete|_run_once) "
    r"|^Handle\._run "
)


def summarize(lines: Iterable[str], top: int = 25) -> str:
    cumulative: Counter[str] = Counter()
    own: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = imports = 0
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        if "_find_and_load" in stack:
            imports += samples  # start-up, not the drain
            continue
        frames = [_frame(f) for f in stack.split(";") if f]
        for label in {label for label, _ in frames}:
            cumulative[label] += samples
        if frames:
            own[frames[-1][0]] += samples
            packages[frames[-1][1]] += samples
    if not total:
        return "no samples"

    def pct(n: int) -> str:
        return f"{100 * n / total:5.1f}%"

    out = [
        f"{total} samples (on-CPU, all threads); {pct(imports).strip()} importing modules at "
        "start-up, left out below; event-loop plumbing left out of the cumulative list",
        "",
        "top functions by cumulative time:",
        "   cum   self  function",
    ]
    listed = [(label, n) for label, n in cumulative.most_common() if not _PLUMBING.search(label)]
    for label, n in listed[:top]:
        out.append(f"{pct(n)} {pct(own[label])}  {label}")
    out += ["", "top functions by self time:"]
    out.extend(f"{pct(n)}  {label}" for label, n in own.most_common(top))
    out += ["", "self time by package:"]
    out.extend(f"{pct(n)}  {name}" for name, n in packages.most_common(15))
    return "\n".join(out)


async def profile(events: int, rate: int, out: Path) -> Path:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    raw = out / "profile.raw.txt"
    wrap = [spy, "record", "--rate", str(rate), "--format", "raw", "--output", str(raw), "--"]
    broker = Broker().open()
    try:
        ctx = Context(quick=False, broker=broker, workdir=out)
        run = await drain_backlog(ctx, events, label="profile", within=60 + events / 200, wrap=wrap)
    finally:
        await broker.close()
    print(
        f"drained {run.consumed:,} of {events:,} events in {run.seconds:.1f}s "
        f"({run.events_per_s:,.0f}/s under the profiler)",
        file=sys.stderr,
    )
    for _ in range(100):  # py-spy writes once the bridge has exited
        if raw.exists():
            break
        await asyncio.sleep(0.1)
    return raw


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--events", type=int, default=50_000, help="backlog size")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25, help="functions to list")
    parser.add_argument("--out", type=Path, help="directory for the profile (default: a new one)")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    raw = asyncio.run(profile(args.events, args.rate, out))
    if not raw.exists():
        print(f"py-spy wrote no profile; see {out}/profile-bridge.log", file=sys.stderr)
        return 1
    summary = summarize(raw.read_text().splitlines(), args.top)
    (out / "profile-summary.txt").write_text(summary + "\n")
    print(summary)
    print(f"\nraw stacks: {raw}\nsummary: {out / 'profile-summary.txt'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
