"""``python -m bench [--only NAME[,NAME]] [--quick] [--seed N] [--json PATH] [--logs DIR]``."""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from bench.broker import Broker
from bench.context import DEFAULT_SEED, Context
from bench.report import Result, document, table, write_json
from bench.scenarios import SCENARIOS


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the bridge against the emulator and a real RabbitMQ "
        "(BENCH_AMQP_URL, default amqp://guest:guest@127.0.0.1:5672/). Targets are "
        "informational: the exit status is 0 whatever they show.",
    )
    parser.add_argument(
        "--only",
        metavar="NAME[,NAME]",
        help=f"run only these scenarios ({', '.join(SCENARIOS)})",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help=f"seed of every random draw (the kill moments); default {DEFAULT_SEED}",
    )
    parser.add_argument(
        "--json", type=Path, default=Path("bench-results.json"), help="where to write results"
    )
    parser.add_argument("--logs", type=Path, help="keep the processes' logs in this directory")
    args = parser.parse_args(argv)
    names = [n.strip() for n in (args.only or ",".join(SCENARIOS)).split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    args.names = names
    return args


async def run_all(
    names: Sequence[str],
    *,
    quick: bool,
    workdir: Path,
    scale: float = 1.0,
    seed: int = DEFAULT_SEED,
) -> list[Result]:
    broker = Broker().open()
    ctx = Context(quick=quick, broker=broker, workdir=workdir, scale=scale, seed=seed)
    print(f"== random seed {seed} (--seed)", file=sys.stderr, flush=True)
    results = []
    try:
        for name in names:
            scenario = SCENARIOS[name]
            result = Result(name, scenario.title)
            print(f"== {scenario.title} ...", file=sys.stderr, flush=True)
            started = time.monotonic()
            try:
                await scenario.run(ctx, result)
            except Exception as exc:
                result.error = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            result.seconds = time.monotonic() - started
            print(f"   done in {result.seconds:.1f}s", file=sys.stderr, flush=True)
            results.append(result)
    finally:
        await broker.close()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        workdir = args.logs or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        results = asyncio.run(
            run_all(args.names, quick=args.quick, workdir=workdir, seed=args.seed)
        )
    print(table(results))
    write_json(args.json, document(results, quick=args.quick, argv=sys.argv[1:]))
    print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
